"""``python -m devprov_demo`` runs the demo CLI."""

import sys

from devprov_demo.cli import main

sys.exit(main())
