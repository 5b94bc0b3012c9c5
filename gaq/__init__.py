"""gaq: post-training quantization of diffusion models with gradient-aligned calibration."""

__version__ = "0.1.0"

_LAZY = {"QuantConfig": "gaq.quant", "quantize": "gaq.quant", "from_pretrained": "gaq.quant",
         "save_quantized": "gaq.quant", "calibrate": "gaq.calib.api",
         "CalibrationConfig": "gaq.calib.api"}  # loaded on first use: `import gaq` stays light


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gaq' has no attribute {name!r}")
