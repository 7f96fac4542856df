#!/usr/bin/env python3
"""Thin wrapper kept for launch/submit and old docs: the sweep logic lives in megaspan/sweep/.

Same interface as ``python -m megaspan.sweep`` (--list/--count/--name/--cell/--freeze). Works with
a bare python3 (no torch, no install): the checkout is put on sys.path.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaspan.sweep.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="sweep.py"))
