"""The ``breakerd`` command line: serve, status, admin commands, events and the demos.

Kept apart from the library: an app that imports :mod:`breakerd.clients`
never loads argparse, the admin client or the demos.
"""

from ._main import main

__all__ = ["main"]
