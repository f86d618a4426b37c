"""``python -m dilated_sparse``: the command line (see :mod:`dilated_sparse.cli`)."""

from .cli import main

raise SystemExit(main(prog="python -m dilated_sparse"))
