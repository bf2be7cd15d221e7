"""Fixtures for the model tests: tiny random-weight HF models (see _tiny.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the _tiny and _slow_reference helpers
