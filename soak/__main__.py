"""``python -m soak [--short]``: see soak.run."""

import sys

from soak.run import main

sys.exit(main())
