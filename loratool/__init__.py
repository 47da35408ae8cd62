"""loratool: LoRA toolkit for Stable Diffusion XL."""

__version__ = "0.1.0"
