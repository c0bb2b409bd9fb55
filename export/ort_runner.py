"""Run exported graphs with onnxruntime: fed and read back as edge_rwkv.State objects (OrtGraph, OrtModel),
or on preallocated buffers with IO binding (IoBoundGraph, the loop export/INTEGRATION.md describes).

Sessions take the export's recommended session config from its manifest (manifest.onnxruntime_options);
token ids are checked before every call.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from edge_rwkv.errors import InputError
from edge_rwkv.state import State

from .manifest import load_manifest
from .state_io import check_token_ids, run_sequence, state_feeds, state_from_outputs


def session_options(session_config: dict | None = None, threads: int | None = None):
    """onnxruntime SessionOptions with the manifest's session config entries (see manifest.onnxruntime_options)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    for key, value in (session_config or {}).items():
        opts.add_session_config_entry(key, str(value))
    return opts


class OrtGraph:
    """One exported graph in an onnxruntime session: fixed batch B, `tokens` per call (T), or any T ≥ 1 when
    the graph was exported with a free token dimension (`any_tokens`, manifest.graphs[name].any_tokens)."""

    def __init__(self, path: str | Path, providers=("CPUExecutionProvider",), threads: int | None = None,
                 session_config: dict | None = None):
        import onnxruntime as ort

        self.path = str(path)
        manifest = load_manifest(Path(path).parent)
        entry = next((g for g in manifest["graphs"].values() if g["file"] == Path(path).name), None)
        if entry is None:
            raise InputError(f"{path}: not a graph listed in the manifest beside it")
        if session_config is None:  # the export's own recommendation
            session_config = manifest["onnxruntime"]["session_config"]
        self.session = ort.InferenceSession(self.path, sess_options=session_options(session_config, threads),
                                            providers=list(providers))
        self.batch, self.tokens = int(entry["batch"]), int(entry["tokens_per_call"])
        self.any_tokens = bool(entry.get("any_tokens", False))
        self.vocab_size = int(next(o for o in self.session.get_outputs() if o.name == "logits").shape[1])
        self.n_layer = sum(1 for i in self.session.get_inputs() if i.name.startswith("wkv."))
        self.output_names = [o.name for o in self.session.get_outputs()]

    def with_tokens(self, tokens: int) -> "OrtGraph":
        """The same session fed `tokens` per call (a graph with any_tokens only): no second copy of the weights."""
        if not self.any_tokens:
            raise InputError(f"{Path(self.path).name} has a fixed token dimension ({self.tokens} per call)")
        view = copy.copy(self)
        view.tokens = int(tokens)
        return view

    def step(self, tokens, state: State) -> tuple[torch.Tensor, State]:
        """tokens [B, T] → (last-token logits [B, V] fp32, next State). `state` is not modified."""
        ids = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[0] != self.batch or ids.shape[1] < 1 or \
                (not self.any_tokens and ids.shape[1] != self.tokens):
            want = "T ≥ 1" if self.any_tokens else str(self.tokens)
            raise InputError(f"{Path(self.path).name} takes tokens of shape [{self.batch}, {want}], got {list(ids.shape)}")
        check_token_ids(ids, self.vocab_size, Path(self.path).name)
        if state.batch != self.batch or state.n_layer != self.n_layer:
            raise InputError(f"state has batch {state.batch} / {state.n_layer} layers; the graph wants {self.batch} / {self.n_layer}")
        feeds = {k: v.cpu().numpy() for k, v in state_feeds(state).items()}
        feeds["tokens"] = ids
        outs = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        new = state_from_outputs(outs, self.n_layer, state, ids.shape[1])
        return torch.from_numpy(outs["logits"]), new


class OrtModel:
    """decode.onnx + prefill.onnx of an export folder: whole sequences in chunks, the rest step by step.

    one_copy=True runs everything through one session of the prefill graph (it must take any number of
    tokens: the onnxruntime target's does), so the process holds one compute copy of the weights instead
    of two; a single token then goes through the prefill graph's Scan, measured as fast as decode.onnx
    (export/INTEGRATION.md, Memory). one_copy=None (the default) does so wherever the export allows it;
    False opens both graphs (verify does, to check decode.onnx itself)."""

    def __init__(self, folder: str | Path, one_copy: bool | None = None, **kw):
        folder = Path(folder)
        manifest = load_manifest(folder)
        kw.setdefault("session_config", manifest["onnxruntime"]["session_config"])
        graphs = manifest["graphs"]
        if one_copy is None:
            one_copy = bool(graphs.get("prefill", {}).get("any_tokens"))
        if one_copy:
            if not graphs.get("prefill", {}).get("any_tokens"):
                raise InputError(f"{folder}: one_copy needs a prefill graph that takes any number of tokens "
                                 "(an export for onnxruntime); this export's graphs have fixed shapes")
            self.prefill = OrtGraph(folder / graphs["prefill"]["file"], **kw)
            self.decode = self.prefill.with_tokens(1)
        else:
            self.decode = OrtGraph(folder / graphs["decode"]["file"], **kw)
            self.prefill = OrtGraph(folder / graphs["prefill"]["file"], **kw) if "prefill" in graphs else None

    def forward(self, tokens, state: State) -> tuple[torch.Tensor, State]:
        return run_sequence(self.decode, self.prefill, tokens, state)


class IoBoundGraph:
    """A graph run with onnxruntime IO binding and two swapped state buffers (the integration guide's loop).

    Both state sets are allocated once; binding A reads set 0 and writes set 1, binding B the reverse, so
    a call copies nothing and allocates nothing: write the ids into `tokens`, run, read `logits`.
    """

    def __init__(self, graph: OrtGraph):
        import onnxruntime as ort

        self.graph, sess = graph, graph.session
        self.tokens = np.zeros((graph.batch, graph.tokens), np.int64)
        self.logits = np.zeros((graph.batch, graph.vocab_size), np.float32)
        self.state = [{i.name: np.zeros(i.shape, np.float32) for i in sess.get_inputs() if i.name != "tokens"}
                      for _ in range(2)]
        tokens_v = ort.OrtValue.ortvalue_from_numpy(self.tokens)
        logits_v = ort.OrtValue.ortvalue_from_numpy(self.logits)
        self.bindings = []
        for src, dst in ((0, 1), (1, 0)):
            b = sess.io_binding()
            b.bind_ortvalue_input("tokens", tokens_v)
            b.bind_ortvalue_output("logits", logits_v)
            for name, buf in self.state[src].items():
                b.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buf))
                b.bind_ortvalue_output(name.replace(".", "_out.", 1), ort.OrtValue.ortvalue_from_numpy(self.state[dst][name]))
            self.bindings.append(b)
        self._keep = (tokens_v, logits_v)
        self.current = 0  # which state set holds the state

    def reset(self) -> None:
        """Zero state: the start of a sequence."""
        for buf in self.state[self.current].values():
            buf.fill(0)

    def step(self, ids) -> np.ndarray:
        """ids [B, T] → logits [B, V] (a view, overwritten by the next call); the state advances."""
        ids = np.asarray(ids, np.int64).reshape(self.tokens.shape)
        check_token_ids(ids, self.graph.vocab_size, Path(self.graph.path).name)
        self.tokens[...] = ids
        self.graph.session.run_with_iobinding(self.bindings[self.current])
        self.current ^= 1
        return self.logits
