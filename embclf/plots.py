"""Moved to ``embclf.report.projections`` (the report package holds every figure); this name stays for the
callers outside the package that still import ``embclf.plots`` (tests/test_gate.py, tests/test_image_folders.py)."""
from .report.projections import *  # noqa: F401,F403
