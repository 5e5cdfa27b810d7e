"""``python -m sweep.cli``: the ``sweep`` command."""

from sweep.cli import main

main()
