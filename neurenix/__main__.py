"""``python -m neurenix``: the ``neurenix`` command."""

import sys

from neurenix.cli import main

sys.exit(main())
