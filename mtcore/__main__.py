"""``python -m mtcore``: the ``mtcore`` command (also what ``torchrun -m mtcore`` runs)."""

import sys

from mtcore.cli.main import main

sys.exit(main())
