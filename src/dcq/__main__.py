"""`python -m dcq` is the same as the `dcq` command."""

import sys

from dcq.cli import main

if __name__ == "__main__":  # guarded: spawn-started worker processes re-import this module
    sys.exit(main())
