"""``python -m breakerd.clients``: the ``breakerd`` command line."""

import sys

from .cli._main import main

if __name__ == "__main__":
    sys.exit(main())
