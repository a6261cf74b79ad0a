"""`python -m headstart` (also what `torchrun -m headstart` runs)."""

import sys

from headstart.cli import main

sys.exit(main())
