"""``python -m wsroute_sync``: see :mod:`wsroute_sync.cli`."""

import sys

from .cli import main

__all__: "list[str]" = []

if __name__ == "__main__":
    sys.exit(main())
