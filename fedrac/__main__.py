"""``python -m fedrac``: the same as the ``fedrac`` command."""

from fedrac.cli import main

main()
