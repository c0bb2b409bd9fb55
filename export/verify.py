"""onnxruntime vs the torch runtime on the same weights: logits and state, step by step and chunked."""
from __future__ import annotations

from pathlib import Path

import torch

from edge_rwkv.state import State

from .manifest import load_manifest
from .ort_runner import OrtModel
from .reference import reference_model
from .source import read_source


# The argmax rule. A step agrees when our argmax is the reference's, or when the reference's two best
# logits are within ARGMAX_TIE_STD × std(reference logits) of each other and our pick is the reference's
# runner-up: such a near-tie is decided by rounding, not by the export (an fp16 export rounds each
# dequantized weight, level × scale, to fp16, which moves logits by ~1e-4 std). Near-ties are counted and
# reported apart from exact matches; any other pick is a miss.
ARGMAX_TIE_STD = 1e-3


def compare(ref: torch.Tensor, got: torch.Tensor) -> float:
    """max |got - ref| / std(ref) (the tolerance measure used for logits)."""
    return float((got.float() - ref.float()).abs().max() / ref.float().std().clamp_min(1e-12))


def argmax_agreement(ref, got, tie_std: float = ARGMAX_TIE_STD) -> str:
    """One step's logits [V], ours against the reference's: "match", "near_tie" (see ARGMAX_TIE_STD) or "miss"."""
    ref, got = torch.as_tensor(ref).float().reshape(-1), torch.as_tensor(got).float().reshape(-1)
    top2 = torch.topk(ref, 2)
    pick = int(got.argmax())
    if pick == int(top2.indices[0]):
        return "match"
    margin = float(top2.values[0] - top2.values[1]) / float(ref.std().clamp_min(1e-12))
    return "near_tie" if pick == int(top2.indices[1]) and margin < tie_std else "miss"


def verify_export(model_path, folder, tokens: int = 40, seed: int = 0, src=None) -> dict:
    """Random tokens through both runtimes; relative logit errors and absolute state errors."""
    m = load_manifest(folder)
    src = src or read_source(model_path, progress=False)
    dtype = m["precision"]["matmul"]
    net, fingerprint = reference_model(src, dtype)
    ort = OrtModel(Path(folder), one_copy=False)  # decode.onnx itself, step by step
    B, V, c = ort.decode.batch, src.config.vocab_size, src.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, tokens), generator=g)
    zero = State.zeros(c.n_layer, B, c.n_embd, c.n_head, c.head_size, "cpu", fingerprint)
    with torch.inference_mode():
        ref_logits, ref_state = net.forward(ids, zero)
    st, worst = zero, 0.0
    argmax = {"match": 0, "near_tie": 0, "miss": 0}
    for t in range(tokens):  # decode graph, one token at a time
        lg, st = ort.decode.step(ids[:, t:t + 1], st)
        worst = max(worst, compare(ref_logits[:, t], lg))
        for row in range(B):
            argmax[argmax_agreement(ref_logits[row, t], lg[row])] += 1
    lg_c, st_c = ort.forward(ids, zero)  # prefill chunks, then decode steps for the rest
    one_session = None  # the runner's default where the prefill graph takes any number of tokens
    if m["graphs"].get("prefill", {}).get("any_tokens"):
        one_session = compare(ref_logits[:, -1], OrtModel(Path(folder), one_copy=True).forward(ids, zero)[0])
    return {
        "tokens": tokens, "batch": B, "dtype": dtype,
        "max_rel": worst,
        # decode steps × batch rows: agreeing (exact matches + near-ties), of which near-ties, and all
        "argmax_agree": argmax["match"] + argmax["near_tie"], "argmax_near_ties": argmax["near_tie"],
        "argmax_total": tokens * B,
        "max_rel_chunked": compare(ref_logits[:, -1], lg_c),
        "max_rel_one_session": one_session,
        "state_max_abs": max(float((getattr(st, p) - getattr(ref_state, p)).abs().max()) for p in ("att_x", "wkv", "ffn_x")),
        "state_max_abs_chunked": max(float((getattr(st_c, p) - getattr(ref_state, p)).abs().max())
                                     for p in ("att_x", "wkv", "ffn_x")),
    }
