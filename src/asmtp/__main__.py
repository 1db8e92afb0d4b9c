"""``python -m asmtp`` works like ``asmtp``."""

import sys

from .cli.main import main

sys.exit(main())
