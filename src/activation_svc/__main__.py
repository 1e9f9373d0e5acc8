"""``python -m activation_svc`` runs the CLI."""

import sys

from activation_svc.cli import main

sys.exit(main())
