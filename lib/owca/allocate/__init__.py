"""owca-allocate: the stage (`stage.py`) and what only it uses.

Names that the single module `owca.allocate` held before the package had one folder per
stage still resolve here, with a DeprecationWarning naming their new home.
"""
from owca import MOVED_FROM_STAGE, moved_names

__getattr__ = moved_names(__name__, MOVED_FROM_STAGE["allocate"])
