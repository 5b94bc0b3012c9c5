"""gaq: post-training quantization of diffusion models with gradient-aligned calibration."""

__version__ = "0.1.0"
