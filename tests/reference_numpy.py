"""An independent float64 numpy implementation of RWKV-7 (x070), one token at a time (test helper).

Written from the published x070 inference semantics (the `RWKV_x070` decode step), not from
edge_rwkv's model code, so that agreement between the two means something. It takes a state dict
in the official layout (numpy arrays, linear weights [out, in], y = x @ Wᵀ) and a list of tokens.

Per token:
    x = LN(emb[token]; ln0)                                   (ln0 only on the embedding)
    per block:  x += time_mix(LN1(x));  x += channel_mix(LN2(x))
    logits = LN(x; ln_out) @ headᵀ
RWKV-7a (DeepEmbed, from the published `rwkv_v7a_demo`) scales each FFN key by a per-token term: with
x0 = LN(emb[token]; ln0) and xx the FFN's LN2 output (before the token shift),
    E = (s_emb[token] + x0 @ s_emb_xᵀ) as a D×D matrix,   k ← k · ((xx @ s1) @ E @ s2 + s0).
Time mixing uses the previous token's LN1 output for the token shift; per head the state S is N×N
(rows index values, columns index keys):
    S ← S·diag(decay) + (S·(-kk)) (kk·a)ᵀ + v kᵀ,   y = S r,   decay = exp(-e^-0.5 · sigmoid(w)).
"""
from __future__ import annotations

import numpy as np

LN_EPS = 1e-5
GN_EPS = 64e-5


def _f64(t) -> np.ndarray:
    return np.asarray(t, dtype=np.float64)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = LN_EPS) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class ReferenceRWKV7:
    """Float64 RWKV-7 x070 decoder with an explicit recurrent state."""

    def __init__(self, sd: dict[str, np.ndarray]):
        self.p = {k: _f64(v) for k, v in sd.items()}
        self.n_layer = 1 + max(int(k.split(".")[1]) for k in self.p if k.startswith("blocks."))
        self.H, self.N = self.p["blocks.0.att.r_k"].shape
        self.C = self.p["emb.weight"].shape[1]
        assert self.H * self.N == self.C
        self.reset()

    def reset(self) -> None:
        L, C, H, N = self.n_layer, self.C, self.H, self.N
        self.att_prev = np.zeros((L, C))
        self.ffn_prev = np.zeros((L, C))
        self.S = np.zeros((L, H, N, N))

    def vec(self, name: str) -> np.ndarray:
        return self.p[name].reshape(-1)

    def step(self, token: int) -> np.ndarray:
        """Consume one token; return its logits (float64 [V])."""
        p, H, N = self.p, self.H, self.N
        x = layer_norm(p["emb.weight"][token], self.vec("blocks.0.ln0.weight"), self.vec("blocks.0.ln0.bias"))
        x0 = x
        v_first = None
        for i in range(self.n_layer):
            b = f"blocks.{i}."
            a = b + "att."
            xx = layer_norm(x, self.vec(b + "ln1.weight"), self.vec(b + "ln1.bias"))
            d = self.att_prev[i] - xx
            self.att_prev[i] = xx
            xr, xw, xk, xv, xa, xg = (xx + d * self.vec(a + n) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
            r = xr @ p[a + "receptance.weight"].T
            w = self.vec(a + "w0") + np.tanh(xw @ p[a + "w1"]) @ p[a + "w2"]
            k = xk @ p[a + "key.weight"].T
            v = xv @ p[a + "value.weight"].T
            gate_a = sigmoid(self.vec(a + "a0") + (xa @ p[a + "a1"]) @ p[a + "a2"])
            g = sigmoid(xg @ p[a + "g1"]) @ p[a + "g2"]
            kk = (k * self.vec(a + "k_k")).reshape(H, N)
            kk = (kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)).reshape(-1)
            k = k * (1 + (gate_a - 1) * self.vec(a + "k_a"))
            if i == 0:
                v_first = v
            else:
                v = v + (v_first - v) * sigmoid(self.vec(a + "v0") + (xv @ p[a + "v1"]) @ p[a + "v2"])
            decay = np.exp(-np.exp(-0.5) * sigmoid(w))
            y = np.empty(self.C)
            for h in range(H):
                sl = slice(h * N, (h + 1) * N)
                S = self.S[i, h]
                kkh = kk[sl]
                S = S * decay[sl][None, :] + np.outer(S @ (-kkh), kkh * gate_a[sl]) + np.outer(v[sl], k[sl])
                self.S[i, h] = S
                yh = S @ r[sl]
                mu, var = yh.mean(), ((yh - yh.mean()) ** 2).mean()
                yh = (yh - mu) / np.sqrt(var + GN_EPS)
                yh = yh * self.vec(a + "ln_x.weight")[sl] + self.vec(a + "ln_x.bias")[sl]
                yh = yh + np.sum(r[sl] * k[sl] * p[a + "r_k"][h]) * v[sl]
                y[sl] = yh
            x = x + (y * g) @ p[a + "output.weight"].T

            f = b + "ffn."
            xx = layer_norm(x, self.vec(b + "ln2.weight"), self.vec(b + "ln2.bias"))
            xk = xx + (self.ffn_prev[i] - xx) * self.vec(f + "x_k")
            self.ffn_prev[i] = xx
            k = np.maximum(xk @ p[f + "key.weight"].T, 0.0) ** 2
            if f + "s1" in p:  # RWKV-7a DeepEmbed
                D = p[f + "s1"].shape[1]
                E = (p[f + "s_emb.weight"][token] + x0 @ p[f + "s_emb_x.weight"].T).reshape(D, D)
                k = k * ((xx @ p[f + "s1"]) @ E @ p[f + "s2"] + self.vec(f + "s0"))
            x = x + k @ p[f + "value.weight"].T
        x = layer_norm(x, self.vec("ln_out.weight"), self.vec("ln_out.bias"))
        return x @ p["head.weight"].T

    def run(self, tokens) -> np.ndarray:
        """Logits [T, V] for each token, continuing the current state."""
        return np.stack([self.step(int(t)) for t in tokens])


def reference_logits(sd: dict, tokens) -> np.ndarray:
    """Float64 logits [T, V] of `tokens` from a fresh state; `sd` holds numpy arrays or torch tensors."""
    arrays = {k: (v.detach().double().cpu().numpy() if hasattr(v, "detach") else v) for k, v in sd.items()}
    return ReferenceRWKV7(arrays).run(tokens)
