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

import numpy as np
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

    def add(self, name: str, data: np.ndarray, dims, data_type: int) -> onnx.TensorProto:
        """A tensor whose bytes are `data`'s buffer (written straight from it, no copy), once per name."""
        if name in self.index:
            if list(dims) != self.index[name][2] or data_type != self.index[name][3]:
                raise RuntimeError(f"initializer '{name}' differs between graphs")
        else:
            buf = memoryview(np.ascontiguousarray(data)).cast("B")
            self._write(b"\0" * ((-self.size) % ALIGN))
            self.index[name] = (self.size, buf.nbytes, list(dims), data_type)
            self._write(buf)
        return self.reference(name)

    def has(self, name: str) -> bool:
        return name in self.index

    def reference(self, name: str) -> onnx.TensorProto:
        """A tensor pointing at the bytes written under `name`."""
        offset, length, dims, data_type = self.index[name]
        t = onnx.TensorProto(name=name, data_type=data_type, dims=dims, data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", offset), ("length", length)):
            t.external_data.add(key=key, value=str(value))
        return t

    def _write(self, data) -> None:
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
