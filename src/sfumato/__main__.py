"""``python -m sfumato`` runs the command line (see :mod:`sfumato.cli`)."""

import sys

from .cli import main

sys.exit(main())
