"""dpok: reinforcement-learning fine-tuning of text-to-image diffusion models (DPOK, DDPO, ...)."""

__version__ = "0.1.0"
