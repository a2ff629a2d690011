"""embclf: sweep autoencoders over latent sizes, then classifiers on their frozen embeddings.

Importing the package registers the structured-config schemas and resolvers with Hydra.
"""
from .config import register as _register

_register()

__version__ = "0.1.0"
