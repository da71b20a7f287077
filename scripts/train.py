"""Thin entry point: same as the `clipforge-train` console command."""

from clipforge.train import main

if __name__ == "__main__":
    main()
