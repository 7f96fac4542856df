"""``python -m megaspan`` = the ``megaspan`` command."""

import sys

from megaspan.cli import main

# Guarded: dist_checkpointing starts 'spawn' helper processes, which re-import __main__.
if __name__ == "__main__":
    sys.exit(main())
