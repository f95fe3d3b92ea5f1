"""`python -m deeprad.operator --mode hub|site ...`: what the operator image and charts run."""

import sys

from deeprad.operator.cli import main

sys.exit(main())
