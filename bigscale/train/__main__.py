"""``python -m bigscale.train [overrides]``: one rank's entry (what torchrun and srun run)."""

import faulthandler
import logging
import os
import sys

from bigscale.train.run import main

# A rank that crashes in native code (SIGSEGV, SIGABRT) prints where each thread was.
faulthandler.enable()
code = main()
# The rank's work is done: metrics, checkpoints and logs are closed and its process groups
# destroyed. It leaves without interpreter finalization, where collective-library threads that
# still hold tensors can abort the process ("terminate called without an active exception",
# SIGABRT) and turn a finished run into a failed one: seen once in CI on a ZeRO-3 gloo rank
# (the cause is described in pytorch/pytorch#179291).
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
