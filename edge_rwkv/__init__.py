"""edge-rwkv: quantized edge inference for RWKV-7.

    import edge_rwkv
    m = edge_rwkv.load("model.safetensors", device="cpu")
    s = m.new_state()
    logits, s = m.forward(m.tokenizer.encode("Hello"), s)
    print(m.generate("The capital of France is", max_tokens=20, temperature=0))
"""
__version__ = "0.1.0"

from .api import Model, load
from .config import ModelConfig
from .errors import CheckpointError, EdgeRWKVError, InputError, StateError
from .sampling import SamplingParams
from .state import State

__all__ = ["load", "Model", "State", "ModelConfig", "SamplingParams",
           "EdgeRWKVError", "CheckpointError", "StateError", "InputError", "__version__"]
