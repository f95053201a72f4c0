import os
import sys

# The repository root, for `experiments` and `configs`, however pytest is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
