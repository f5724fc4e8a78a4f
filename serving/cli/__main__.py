"""``python -m serving.cli``: the ``freshet`` command."""

import sys

from serving.cli import main

sys.exit(main())
