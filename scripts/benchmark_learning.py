"""Thin entry point: same as `clipforge-benchmark learning` (learning parity with open_clip's trainer)."""

from clipforge.bench.learning import main

if __name__ == "__main__":
    main()
