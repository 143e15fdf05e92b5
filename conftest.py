# Make the top-level `reference/` oracle importable from tests (it is not an installed package).
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
