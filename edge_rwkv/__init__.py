"""edge-rwkv: quantized edge inference for RWKV-7."""
__version__ = "0.1.0"
