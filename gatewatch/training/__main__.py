"""``python -m gatewatch.training``: kept for compatibility, the same as ``python -m gatewatch.demo``."""

import sys

from ..demo.command import main

sys.exit(main())
