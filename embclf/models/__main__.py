"""`python -m embclf.models`: print each architecture's parameter count for a few latent sizes."""
from hydra import compose, initialize_config_dir

from embclf.config import conf_dir
from embclf.models import build_model, count_parameters

LATENTS = (32, 64, 128, 256)

print("| model | " + " | ".join(f"latent {z}" for z in LATENTS) + " |")
print("|---|" + "---:|" * len(LATENTS))
with initialize_config_dir(config_dir=conf_dir(), version_base=None):
    for name in ("ae", "vae", "resnet", "resnet_vae"):
        m = compose("config", overrides=[f"model={name}"]).model
        print(f"| {name} | " + " | ".join(f"{count_parameters(build_model(m, z)):,}" for z in LATENTS) + " |")
