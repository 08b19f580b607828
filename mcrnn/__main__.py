"""``python -m mcrnn ...`` is the ``mcrnn`` command (see :mod:`mcrnn.cli`)."""

import sys

from mcrnn.cli import main

sys.exit(main())
