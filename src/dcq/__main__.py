"""`python -m dcq` is the same as the `dcq` command."""

import sys

from dcq.cli import main

sys.exit(main())
