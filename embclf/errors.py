"""The two errors the entrypoint prints as one paragraph without a traceback (exit status 2).

They live here, not in ``embclf.runtime`` (which re-exports them), so that the modules which only read run dirs
(``runs``, ``references``, ``locks``, the report) need no torch: ``python -m embclf.report`` and the launcher's
planning start without importing it.
"""


class EmbclfError(RuntimeError):
    """Bad input or a missing prerequisite. The message is one paragraph that names the key or file and the fix.

    The entrypoint prints it without a traceback and exits with status 2.
    """


class DataError(RuntimeError):
    """A data source is missing, unreadable or misconfigured; the message says how to fix it (``embclf.data``,
    ``embclf.image_folder``). The entrypoint prints it like ``EmbclfError``."""
