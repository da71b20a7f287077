"""Thin entry point: same as `clipforge-benchmark` (training-step throughput vs open_clip)."""

from clipforge.bench.step import main

if __name__ == "__main__":
    main()
