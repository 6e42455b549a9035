"""``python -m sink_modifier.cli``: the ``sink-prune`` command line (imports the package first)."""

import sys

from sink_modifier.cli.main import main

sys.exit(main())
