"""``python -m factory_svc`` runs the CLI."""

import sys

from factory_svc.cli import main

sys.exit(main())
