"""ldae-bids: Latent Diffusion Autoencoders as a BIDS App."""

__version__ = "0.1.0"
__all__ = ["__version__"]
