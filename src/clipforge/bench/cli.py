"""``clipforge-benchmark``: every benchmark of clipforge against open_clip behind one command.

    clipforge-benchmark [step] --models vit_b16:256 ...   training-step throughput (clipforge.bench.step)
    clipforge-benchmark learning ...                       models trained by both trainers (bench.learning)
    clipforge-benchmark loss ...                           loss time and memory (clipforge.bench.losses)
    clipforge-benchmark memory ...                         a step's peak memory with grad checkpointing (bench.memory)
    clipforge-benchmark profile ...                        top kernels of the step (clipforge.bench.profile)
    clipforge-benchmark loader ...                         loader throughput (clipforge.bench.loader)
    clipforge-benchmark siglip2 ...                        what the SigLIP 2 objectives add (bench.siglip2)
    clipforge-benchmark init ...                           which weight init trains a model fastest (bench.init_sweep)

Without a benchmark name the arguments go to ``step`` (the command's first and original meaning).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from clipforge.console import console_script

BENCHMARKS = {
    "step": "clipforge.bench.step",
    "learning": "clipforge.bench.learning",
    "loss": "clipforge.bench.losses",
    "memory": "clipforge.bench.memory",
    "profile": "clipforge.bench.profile",
    "loader": "clipforge.bench.loader",
    "siglip2": "clipforge.bench.siglip2",
    "init": "clipforge.bench.init_sweep",
}


def benchmark(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark named first in ``argv`` (default: ``step``) with the rest of it."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    name = args.pop(0) if args and args[0] in BENCHMARKS else "step"
    importlib.import_module(BENCHMARKS[name]).main(args)


main = console_script("clipforge-benchmark", benchmark)  # the console script

if __name__ == "__main__":  # python -m clipforge.bench.cli: where the console script is not installed
    sys.exit(main())
