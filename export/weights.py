"""`weights.bin`: every large initializer of both graphs, written once, as the graphs are built.

Tensors are appended as they are made (export never holds a graph's weights in memory) at offsets
aligned to ALIGN bytes: onnxruntime memory-maps page-aligned external data on a CPU instead of
copying it, so two sessions over the same file share one copy of the weights in the page cache.
A tensor is stored once per name; the second graph points at the bytes the first one wrote.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx

WEIGHTS_FILE = "weights.bin"
ALIGN = 4096  # the page size: onnxruntime maps (not reads) external data at page-aligned offsets
INLINE_MAX_BYTES = 1024  # smaller initializers (shape constants, norm vectors) stay inside the graph


class WeightsFile:
    """Append-only external data file shared by the graphs of one export."""

    def __init__(self, path: Path, location: str = WEIGHTS_FILE):
        self.path, self.location = Path(path), location  # written at `path`, named `location` in the graphs
        self.fh = open(self.path, "wb")
        self.index: dict[str, tuple[int, int, list[int], int]] = {}  # name -> (offset, length, dims, type)
        self.sha = hashlib.sha256()
        self.size = 0

    def externalize(self, t: onnx.TensorProto) -> onnx.TensorProto:
        """Move `t`'s raw bytes to the file (once per name) and point `t` at them."""
        if t.name in self.index:
            if list(t.dims) != self.index[t.name][2] or t.data_type != self.index[t.name][3]:
                raise RuntimeError(f"initializer '{t.name}' differs between graphs")
        elif len(t.raw_data) <= INLINE_MAX_BYTES:
            return t
        else:
            self._write(b"\0" * ((-self.size) % ALIGN))
            self.index[t.name] = (self.size, len(t.raw_data), list(t.dims), t.data_type)
            self._write(t.raw_data)
        offset, length = self.index[t.name][:2]
        t.ClearField("raw_data")
        del t.external_data[:]
        for key, value in (("location", self.location), ("offset", offset), ("length", length)):
            t.external_data.add(key=key, value=str(value))
        t.data_location = onnx.TensorProto.EXTERNAL
        return t

    def has(self, name: str) -> bool:
        return name in self.index

    def reference(self, name: str) -> onnx.TensorProto:
        """A tensor pointing at bytes already written under `name`."""
        t = onnx.TensorProto(name=name, data_type=self.index[name][3], dims=self.index[name][2])
        return self.externalize(t)

    def _write(self, data: bytes) -> None:
        if data:
            self.fh.write(data)
            self.sha.update(data)
            self.size += len(data)

    def close(self) -> str:
        """Flush, fsync and close; returns the file's sha256."""
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        return self.sha.hexdigest()
