"""`python -m specalign` = the `specalign` command."""

import sys

from specalign.cli import main

sys.exit(main())
