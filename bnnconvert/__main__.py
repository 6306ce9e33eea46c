"""``python -m bnnconvert``: the command line (see :mod:`bnnconvert.cli`)."""

from .cli import main

main(prog_name="bnnconvert")
