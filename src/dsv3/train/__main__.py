"""`python -m dsv3.train ...` (the entry torchrun launches): the same arguments as `dsv3 train`."""

import sys

from dsv3.train.cli import main

sys.exit(main())
