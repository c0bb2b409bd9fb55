"""Run a TensorRT engine built from an exported graph, fed with edge_rwkv.State objects.

    eng = TrtGraph("out/decode.engine")
    state = State.zeros(L, eng.batch, C, H, N, "cuda")
    logits, state = eng.step(torch.tensor([[tok]]), state)

Buffers live in torch CUDA tensors; the engine's I/O names follow the manifest (`tokens`, `logits`,
`att_x.{i}` … → `att_x_out.{i}` …). Needs `tensorrt` and a GPU (`TensorRTUnavailable` otherwise).
"""
from __future__ import annotations

from pathlib import Path

import torch

from edge_rwkv.errors import InputError
from edge_rwkv.state import State

from .manifest import load_manifest
from .state_io import check_token_ids, run_sequence, state_feeds, state_from_outputs
from .tensorrt import TensorRTUnavailable, tensorrt_available


def _torch_dtype(trt, dt):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
             trt.int32: torch.int32, trt.int8: torch.int8, trt.bool: torch.bool}
    if dt not in table:
        raise InputError(f"engine tensor type {dt} is not supported by this runner")
    return table[dt]


class TrtGraph:
    """One engine (fixed batch B, tokens per call T) with persistent device buffers."""

    def __init__(self, engine_path: str | Path, device: str = "cuda"):
        ok, why = tensorrt_available()
        if not ok:
            raise TensorRTUnavailable(f"cannot run {engine_path}: {why}")
        import tensorrt as trt

        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise InputError(f"{engine_path}: not a TensorRT engine for this TensorRT version / GPU")
        self.context = self.engine.create_execution_context()
        self.buffers: dict[str, torch.Tensor] = {}
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            buf = torch.empty(shape, dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(name)), device=self.device)
            self.buffers[name] = buf
            self.context.set_tensor_address(name, buf.data_ptr())
            (self.inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(name)
        self.batch, self.tokens = self.buffers["tokens"].shape
        self.n_layer = sum(1 for n in self.inputs if n.startswith("wkv."))
        self.stream = torch.cuda.Stream(device=self.device)

    def step(self, tokens, state: State) -> tuple[torch.Tensor, State]:
        """tokens [B, T] → (last-token logits [B, V] fp32, next State on the engine's device)."""
        ids = torch.as_tensor(tokens, dtype=torch.int64)
        if ids.dim() == 1:
            ids = ids[None]
        if tuple(ids.shape) != (self.batch, self.tokens):
            raise InputError(f"engine takes tokens [{self.batch}, {self.tokens}], got {list(ids.shape)}")
        check_token_ids(ids.numpy(), self.buffers["logits"].shape[1], "TensorRT engine")
        if state.batch != self.batch or state.n_layer != self.n_layer:
            raise InputError(f"state has batch {state.batch} / {state.n_layer} layers; engine wants {self.batch} / {self.n_layer}")
        with torch.cuda.stream(self.stream):
            self.buffers["tokens"].copy_(ids, non_blocking=True)
            for name, t in state_feeds(state).items():
                self.buffers[name].copy_(t, non_blocking=True)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        outs = {n: self.buffers[n].clone() for n in self.outputs}
        new = state_from_outputs(outs, self.n_layer, state, self.tokens)
        return outs["logits"], new


class TrtModel:
    """decode + prefill engines of an export folder (like OrtModel, on TensorRT)."""

    def __init__(self, folder: str | Path, device: str = "cuda"):
        folder = Path(folder)
        m = load_manifest(folder)
        engines = dict(m.get("engines") or {})
        for g in m["graphs"]:  # engines built with trtexec sit beside the graphs without a manifest entry
            if g not in engines and (folder / f"{g}.engine").is_file():
                engines[g] = f"{g}.engine"
        if "decode" not in engines:
            raise InputError(f"{folder}: no TensorRT engines recorded in the manifest (run `edge-rwkv export "
                             f"--format tensorrt` or trtexec, see jetson/TENSORRT.md)")
        self.decode = TrtGraph(folder / engines["decode"], device)
        self.prefill = TrtGraph(folder / engines["prefill"], device) if "prefill" in engines else None

    def forward(self, tokens, state: State) -> tuple[torch.Tensor, State]:
        return run_sequence(self.decode, self.prefill, tokens, state)
