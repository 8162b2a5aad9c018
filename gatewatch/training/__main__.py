"""``python -m gatewatch.training``: the demo (see :mod:`gatewatch.training.demo`)."""

import sys

from .demo import main

sys.exit(main())
