"""``python -m gatewatch.demo``: the demo (see :mod:`gatewatch.demo.command`)."""

import sys

from .command import main

sys.exit(main())
