"""``python -m supersub.cli``: the ``supersub`` console script without its installed wrapper."""

import sys

from supersub.cli import main

sys.exit(main())
