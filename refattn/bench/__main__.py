"""``python -m refattn.bench ...`` = ``refattn bench ...``."""

import sys

from refattn.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
