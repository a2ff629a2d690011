"""``python -m embclf.report``: see ``embclf.report`` (the package docstring) and ``--help``."""
import sys

from .cli import main

sys.exit(main())
