#!/usr/bin/env python
"""Django's command line for the example project (``python manage.py runserver``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> None:
    # The project is the package this file is in: its parent folder goes on the path.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
