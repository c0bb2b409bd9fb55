"""Random RWKV-7 weights in the official x070 layout (key names and shapes as BlinkDL releases them).

Used by tests, benchmarks and `edge-rwkv init` to build models of any size without downloading one.
Initial values follow the spirit of the official init so random models produce varied, finite logits.
"""
from __future__ import annotations

import torch

HEAD_SIZE = 64  # as released
VOCAB = 65536  # the World tokenizer's
# Random-weight sizes by name, (n_layer, n_embd): `edge-rwkv bench --preset`, the benchmarks, `edge-rwkv plan`
PRESETS = {"tiny": (2, 128), "0.1b": (12, 768), "1.5b": (24, 2048), "7.2b": (32, 4096)}


def lora_ranks(n_embd: int) -> dict[str, int]:
    """Default LoRA ranks as the official trainer picks them for a given width."""
    def r(scale, exp):
        return max(32, int(round((scale * n_embd**exp) / 32) * 32))

    return {"decay": r(1.8, 0.5), "aaa": r(1.8, 0.5), "mv": r(1.3, 0.5), "gate": r(0.6, 0.8)}


def random_checkpoint(
    n_layer: int = 2,
    n_embd: int = 128,
    head_size: int = HEAD_SIZE,
    vocab_size: int = VOCAB,
    dim_ffn: int | None = None,
    ranks: dict[str, int] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    deep_embed: int = 0,
) -> dict[str, torch.Tensor]:
    """Official-layout state dict with random weights; `deep_embed` D > 0 makes an RWKV-7a model (DeepEmbed)."""
    if n_embd % head_size:
        raise ValueError("n_embd must be a multiple of head_size")
    g = torch.Generator().manual_seed(seed)
    C, N, H = n_embd, head_size, n_embd // head_size
    F = dim_ffn or 4 * C
    rk = ranks or lora_ranks(C)

    def rand(*shape, scale=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * scale + mean

    def unif(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    sd: dict[str, torch.Tensor] = {"emb.weight": rand(vocab_size, C, scale=1.0)}
    for i in range(n_layer):
        p = f"blocks.{i}."
        if i == 0:
            sd[p + "ln0.weight"] = rand(C, scale=0.1, mean=1.0)
            sd[p + "ln0.bias"] = rand(C, scale=0.1)
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"] = rand(C, scale=0.1, mean=1.0)
            sd[p + ln + ".bias"] = rand(C, scale=0.1)
        a = p + "att."
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[a + name] = unif(1, 1, C)
        sd[a + "w0"] = unif(1, 1, C, lo=-4.0, hi=1.0)
        sd[a + "w1"] = rand(C, rk["decay"], scale=0.1)
        sd[a + "w2"] = rand(rk["decay"], C, scale=0.1)
        sd[a + "a0"] = rand(1, 1, C, scale=0.5)
        sd[a + "a1"] = rand(C, rk["aaa"], scale=0.1)
        sd[a + "a2"] = rand(rk["aaa"], C, scale=0.1)
        sd[a + "v0"] = rand(1, 1, C, scale=0.5, mean=1.0)
        sd[a + "v1"] = rand(C, rk["mv"], scale=0.1)
        sd[a + "v2"] = rand(rk["mv"], C, scale=0.1)
        sd[a + "g1"] = rand(C, rk["gate"], scale=0.1)
        sd[a + "g2"] = rand(rk["gate"], C, scale=0.1)
        sd[a + "k_k"] = unif(1, 1, C, lo=0.7, hi=1.0)
        sd[a + "k_a"] = unif(1, 1, C, lo=0.8, hi=1.2)
        sd[a + "r_k"] = rand(H, N, scale=0.3)
        for name in ("receptance", "key", "value", "output"):
            sd[a + name + ".weight"] = rand(C, C, scale=C**-0.5)
        sd[a + "ln_x.weight"] = rand(C, scale=0.1, mean=1.0)
        sd[a + "ln_x.bias"] = rand(C, scale=0.1)
        f = p + "ffn."
        sd[f + "x_k"] = unif(1, 1, C)
        sd[f + "key.weight"] = rand(F, C, scale=C**-0.5)
        sd[f + "value.weight"] = rand(C, F, scale=F**-0.5)
        if deep_embed:
            D = deep_embed
            sd[f + "s_emb.weight"] = rand(vocab_size, D * D, scale=0.3)
            sd[f + "s_emb_x.weight"] = rand(D * D, C, scale=0.1)
            sd[f + "s0"] = rand(1, 1, F, scale=0.1, mean=1.0)
            sd[f + "s1"] = rand(C, D, scale=C**-0.5)
            sd[f + "s2"] = rand(D, F, scale=0.1)
    sd["ln_out.weight"] = rand(C, scale=0.1, mean=1.0)
    sd["ln_out.bias"] = rand(C, scale=0.1)
    sd["head.weight"] = rand(vocab_size, C, scale=C**-0.5 * 4)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}
