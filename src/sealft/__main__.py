"""`python -m sealft` (what `accelerate launch -m sealft` and `torchrun -m sealft` run)."""

import sys

from sealft.cli import main

sys.exit(main())
