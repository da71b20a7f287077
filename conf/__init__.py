"""clipforge's Hydra config tree, shipped inside the package as ``clipforge.conf``.

``conf/`` at the top of the repository is the source of truth; the build maps it to the
``clipforge.conf`` package (``[tool.setuptools.package-dir]`` in pyproject.toml), so a wheel install
finds the YAML files next to the code, from any working directory. :data:`CONF_DIR` is that folder.
"""

from pathlib import Path

CONF_DIR: Path = Path(__file__).resolve().parent
