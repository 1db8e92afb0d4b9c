"""``python -m asmtp`` works like ``asmtp``."""

import sys

from .cli import main

sys.exit(main())
