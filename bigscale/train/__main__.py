"""``python -m bigscale.train [overrides]``: one rank's entry (what torchrun and srun run)."""

import sys

from bigscale.train.run import main

sys.exit(main())
