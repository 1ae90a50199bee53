"""`python -m streamsvd ...` (and `torchrun -m streamsvd ...`): the same command line as `streamsvd`."""

import sys

from .cli import main

sys.exit(main())
