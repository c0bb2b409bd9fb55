"""The one reader of safetensors headers (model files, artifacts, state files, Hugging Face shards).

Layout (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian unsigned length N,
then N bytes of JSON — an object mapping each tensor name to {"dtype", "shape", "data_offsets": [begin,
end]} (offsets relative to the data section that follows the header), plus an optional "__metadata__"
object of string values — then the tensor data.

Everything a header claims is checked before a byte of tensor data is trusted: the length against the
file and a bound, the JSON through schema.load_json (bounded nesting), every entry's dtype, shape and
offsets against the file's size. Errors are HeaderError subclasses whose message names the problem but
not the file: each format's reader adds the path and turns them into its own error type.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

from .schema import Int, List, Obj, Opt, SchemaError, Str, load_json

LENGTH = struct.Struct("<Q")  # the header's length prefix
MAX_HEADER = 100 << 20  # the bound the safetensors library itself enforces
METADATA_KEY = "__metadata__"

ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
            "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
_TENSOR_ENTRY = Obj({"dtype": Str(16), "shape": List(Int(0, 1 << 40), 8), "data_offsets": List(Int(0), 2)})
_METADATA = Opt(Obj({}, extra=Str(1 << 26)))


class HeaderError(ValueError):
    """The bytes are not a well-formed safetensors header; the message says why (without the path)."""


class HeaderTruncated(HeaderError):
    """Fewer than 8 bytes, or a header length that runs past the end of the file."""


class HeaderTooLarge(HeaderError):
    """A header length beyond the reader's bound (no real header is that large)."""


class HeaderNotJSON(HeaderError):
    """The header bytes are not a JSON object (or nest too deep)."""


class HeaderEntryError(HeaderError):
    """`__metadata__` or a tensor entry has the wrong type, an unknown dtype, or a size that disagrees."""


class TensorBeyondFile(HeaderEntryError):
    """A tensor's data offsets run past the end of the file: the file was cut short."""


@dataclass(frozen=True)
class Header:
    tensors: dict[str, dict]  # name → {"dtype", "shape", "data_offsets"}, every entry checked
    metadata: dict[str, str]  # `__metadata__` ({} when absent)
    length: int  # bytes of header JSON: the data section starts at 8 + length

    @property
    def data_start(self) -> int:
        return LENGTH.size + self.length


def declared_length(head: bytes) -> int | None:
    """The header length the first 8 bytes declare (None for fewer than 8 bytes)."""
    return LENGTH.unpack(head[:LENGTH.size])[0] if len(head) >= LENGTH.size else None


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """Whether a file of `size` bytes starting with `head` (≥ 9 bytes read) is plausibly safetensors:
    a length that fits the file, then a JSON object. The length may begin with any byte, 0x80 included."""
    n = declared_length(head)
    return n is not None and 2 <= n <= size - LENGTH.size and head[8:9] == b"{"


def parse(data: bytes, size: int | None = None, max_header: int = MAX_HEADER) -> Header:
    """The checked header of a file whose first bytes are `data` (at least the whole header) and whose
    size is `size` (default: `data` is the whole file)."""
    size = len(data) if size is None else size
    n = declared_length(data)
    if n is None:
        raise HeaderTruncated(f"truncated safetensors header ({size} bytes)")
    if n > size - LENGTH.size:
        raise HeaderTruncated(f"safetensors header length {n} exceeds the file ({size} bytes)")
    if n > max_header:
        raise HeaderTooLarge(f"safetensors header of {n} bytes is larger than the limit of {max_header}")
    if len(data) < LENGTH.size + n:
        raise HeaderTruncated(f"truncated safetensors header ({len(data)} of {LENGTH.size + n} bytes read)")
    try:
        header = load_json(data[LENGTH.size:LENGTH.size + n])
    except SchemaError as e:
        raise HeaderNotJSON(f"corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise HeaderNotJSON("corrupt safetensors header (not an object)")
    meta = header.pop(METADATA_KEY, None)
    try:
        _METADATA.check(meta, METADATA_KEY)
    except SchemaError as e:
        raise HeaderEntryError(f"corrupt safetensors header ({e})") from None
    data_len = size - LENGTH.size - n
    for name, info in header.items():
        _check_entry(name, info, data_len)
    return Header(header, meta or {}, n)


def read(path: str | os.PathLike, max_header: int = MAX_HEADER) -> Header:
    """The checked header of the file at `path` (reads the header only, never the tensor data)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(LENGTH.size)
        n = declared_length(head)
        if n is not None and n <= min(size - LENGTH.size, max_header):
            head += f.read(n)
    return parse(head, size, max_header)


def _check_entry(name: str, info, data_len: int) -> None:
    try:
        _TENSOR_ENTRY.check(info, f"tensor '{name}'")
    except SchemaError as e:
        raise HeaderEntryError(f"corrupt safetensors header ({e})") from None
    if len(info["data_offsets"]) != 2:
        raise HeaderEntryError(f"tensor '{name}' has no valid data offsets")
    begin, end = info["data_offsets"]
    if not begin <= end <= data_len:
        raise TensorBeyondFile(f"tensor '{name}' lies beyond the end of the file (truncated: needs {end} data "
                               f"bytes, has {data_len})")
    itemsize = ITEMSIZE.get(info["dtype"])
    if itemsize is None:
        raise HeaderEntryError(f"tensor '{name}' has unknown dtype {info['dtype']!r}")
    if math.prod(info["shape"]) * itemsize != end - begin:
        raise HeaderEntryError(f"tensor '{name}' has shape {info['shape']} ({info['dtype']}) but "
                               f"{end - begin} data bytes")
