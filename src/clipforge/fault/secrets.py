"""Keep credentials out of logged configs and checkpoints.

No paper. The resolved config is logged (W&B, CSV hparams) and stored in every checkpoint; an
``${oc.env:WANDB_API_KEY}`` interpolation or a ``logger.api_key=...`` override would otherwise copy a
secret into both. Two rules, applied recursively: a string under a key that names a credential is
masked, and any string equal to the value of a credential environment variable is masked wherever it
sits. Non-string values are left alone, so model fields such as an integer ``eot_token`` survive.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

MASK = "***"
# Words that make a key a credential wherever they appear in it ("db_password", "aws_secret_access_key").
SECRET_WORDS = frozenset(
    [
        "password",
        "passwd",
        "secret",
        "credential",
        "credentials",
        "apikey",
        "accesskey",
        "privatekey",
        "bearer",
    ]
)
KEY_QUALIFIERS = frozenset(["api", "access", "private", "secret", "signing"])  # "<qualifier>_key"
VOCAB_TOKENS = frozenset(
    ["pad", "eos", "bos", "unk", "sot", "eot", "mask", "cls", "sep", "start", "end"]
)  # "eot_token" is vocabulary
SECRET_ENV = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """``api_key``, ``WANDB_API_KEY``, ``hf_token``, ``aws_secret_access_key``, ``db-password``: True;
    ``eot_token``, ``tokens``, ``key``, ``monitor``: False."""
    words = [w for w in re.split(r"[_\-.\s]+", str(key).lower()) if w]
    if not words or any(w in SECRET_WORDS for w in words):
        return bool(words)
    if words[-1] == "key" and len(words) > 1 and words[-2] in KEY_QUALIFIERS:
        return True
    return words[-1] == "token" and (len(words) == 1 or words[-2] not in VOCAB_TOKENS)


def _secret_env_values() -> set[str]:
    # Short values ("1", "true") are flags, not secrets, and would mask innocent config values.
    return {v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= 8}


def _scrub_tree(obj: Any, scrub_string: Callable[[str], str]) -> Any:
    """A copy of nested dicts/lists/tuples with each non-empty string under a credential key masked and
    every other non-empty string passed through ``scrub_string``."""

    def scrub(x: Any, key: str | None) -> Any:
        if isinstance(x, dict):
            return {k: scrub(v, str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(scrub(v, key) for v in x)
        if isinstance(x, str) and x:
            return MASK if key is not None and is_secret_key(key) else scrub_string(x)
        return x

    return scrub(obj, None)


def scrub_secrets(obj: Any, secret_values: set[str] | None = None) -> Any:
    """A copy of ``obj`` (nested dicts/lists of primitives) with credentials replaced by ``"***"``."""
    values = _secret_env_values() if secret_values is None else secret_values
    return _scrub_tree(obj, lambda x: MASK if x in values else x)


def _override_key(item: str) -> str | None:
    """``"+logger.api_key=abc"`` -> ``"api_key"``; None for a string that is not an override."""
    key, sep, _ = item.partition("=")
    key = key.lstrip("+~").strip()
    if not sep or not key or any(c.isspace() for c in key):
        return None
    return key.rsplit(".", 1)[-1].rsplit("/", 1)[-1]


def scrub_override(item: str, secret_values: set[str] | None = None) -> str:
    """One command-line override (``"logger.api_key=abc"`` -> ``"logger.api_key=***"``), or Hydra's
    comma-joined ``override_dirname``; a known secret value is masked wherever it appears."""
    values = _secret_env_values() if secret_values is None else secret_values
    parts = []
    for part in item.split(","):
        key = _override_key(part)
        if key is not None and is_secret_key(key):
            part = part.partition("=")[0] + "=" + MASK
        parts.append(part)
    out = ",".join(parts)
    for v in sorted(values, key=len, reverse=True):
        out = out.replace(v, MASK)
    return out


def scrub_hydra_files(hydra_dir: str | os.PathLike, overrides: list[str] | None = None) -> list[str]:
    """Mask credentials in the files Hydra writes before the job starts (``config.yaml``, ``hydra.yaml``
    and ``overrides.yaml`` under ``<run dir>/.hydra``), which otherwise keep the command line as typed.

    Secrets are: strings under credential keys (in the config or in an override), the values given to
    such keys on the command line wherever else they are copied (``override_dirname``, ``task``), and the
    values of credential environment variables. Returns the names of the files rewritten.
    """
    from pathlib import Path

    import yaml

    hydra_dir = Path(hydra_dir)
    values = _secret_env_values()
    for item in overrides or []:
        key = _override_key(item)
        value = item.partition("=")[2].strip().strip("'\"")
        if key is not None and is_secret_key(key) and value:
            values.add(value)

    changed = []
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        path = hydra_dir / name
        if not path.is_file():
            continue
        data = yaml.safe_load(path.read_text())
        clean = _scrub_tree(data, lambda x: scrub_override(x, values))
        if clean != data:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(yaml.safe_dump(clean, sort_keys=False, allow_unicode=True))
            os.replace(tmp, path)
            changed.append(name)
    return changed


def scrub_current_hydra_run() -> list[str]:
    """:func:`scrub_hydra_files` for the running Hydra job (a no-op outside one or with
    ``hydra.output_subdir=null``)."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    hc = HydraConfig.get()
    if hc.output_subdir is None:
        return []
    return scrub_hydra_files(Path(hc.runtime.output_dir) / hc.output_subdir, list(hc.overrides.task))
