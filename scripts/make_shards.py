"""Write WebDataset shards with a manifest: see ``clipforge-shards --help`` (clipforge.data.cli)."""

import sys

from clipforge.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
