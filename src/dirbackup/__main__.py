"""`python -m dirbackup`: the command line."""

import sys

from dirbackup.cli import main

sys.exit(main())
