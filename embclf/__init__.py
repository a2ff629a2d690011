"""embclf: sweep autoencoders over latent sizes, then classifiers on their frozen embeddings.

Importing the package does nothing else: ``embclf.config`` adds its schema to Hydra's ConfigStore and its
run-dir-name resolvers to OmegaConf when it is imported (by the entrypoint, the launchers and anything that
composes ``conf/``); nothing in Hydra is patched.
"""

__version__ = "0.1.0"
