"""``python -m fedrac.deploy``: see :mod:`fedrac.deploy.cli`."""

from fedrac.deploy.cli import main

main()
