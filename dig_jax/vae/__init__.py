"""The Stable Diffusion VAE (sd-vae-ft-ema) in Flax NNX, and a torch-free diffusers weights loader."""
from dig_jax.vae.autoencoder_kl import AutoencoderKL, VAEConfig, sample_latent
from dig_jax.vae.load_diffusers import (diffusers_key, from_diffusers_state_dict, load_vae, save_diffusers,
                                        to_diffusers_state_dict)

__all__ = ["AutoencoderKL", "VAEConfig", "sample_latent", "load_vae", "save_diffusers",
           "from_diffusers_state_dict", "to_diffusers_state_dict", "diffusers_key"]
