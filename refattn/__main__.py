"""``python -m refattn`` is the ``refattn`` command."""

import sys

from refattn.cli import main

sys.exit(main())
