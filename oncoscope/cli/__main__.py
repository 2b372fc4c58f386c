"""``python -m oncoscope.cli`` (used where the console script is not installed, e.g. by bench/load.py)."""

from . import main

main()
