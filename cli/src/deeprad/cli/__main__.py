"""`python -m deeprad.cli ...`: the `deeprad` command."""

import sys

from deeprad.cli import main

sys.exit(main())
