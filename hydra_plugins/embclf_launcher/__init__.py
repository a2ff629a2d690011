"""embclf's Hydra launchers: ``hydra/launcher=local`` (GPU/CPU slot pool) and ``hydra/launcher=slurm``.

``hydra_plugins`` itself is a namespace package shared with other Hydra plugins (no ``__init__.py``
there); Hydra imports every module under it at start-up, which registers the configs in
``config.py``.  Keep module-level imports light.
"""
