"""`python -m threeds` runs the command line."""

import sys

from threeds.cli import main

sys.exit(main())
