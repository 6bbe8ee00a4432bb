"""``python -m mlabel.report RUN_DIR [--split val|test]``."""
import sys

from . import main

sys.exit(main())
