"""``python -m pfl``: see :mod:`pfl.cli`."""

from pfl.cli import main

raise SystemExit(main())
