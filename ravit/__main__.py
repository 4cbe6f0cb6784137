"""``python -m ravit`` (also what ``torchrun -m ravit`` runs)."""

import sys

from ravit.cli import main

sys.exit(main())
