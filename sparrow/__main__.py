"""``python -m sparrow``: the same as the ``sparrow`` console script."""

from __future__ import annotations

import sys

from sparrow.cli import main

if __name__ == "__main__":
    sys.exit(main())
