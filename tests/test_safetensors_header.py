"""The one safetensors header reader: every claim of the header checked against the file before use."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save

from edge_rwkv import safetensors_header as sh


def _good() -> bytes:
    return save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(4, dtype=torch.int8)},
                metadata={"note": "hello"})


def _with_header(data: bytes, header: dict) -> bytes:
    """`data` with its header replaced by `header` (padded to 8 bytes, as safetensors writes it)."""
    (n,) = struct.unpack("<Q", data[:8])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _header_of(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])


def test_good_file(tmp_path):
    data = _good()
    h = sh.parse(data)
    assert sorted(h.tensors) == ["a", "b"]
    assert h.tensors["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": h.tensors["a"]["data_offsets"]}
    assert h.metadata == {"note": "hello"}
    assert h.data_start == 8 + struct.unpack("<Q", data[:8])[0]
    assert len(data) - h.data_start == 6 * 4 + 4  # the data section holds exactly the two tensors
    path = tmp_path / "good.safetensors"
    path.write_bytes(data)
    assert sh.read(path) == h
    assert sh.looks_like_safetensors(data[:16], len(data))


def test_no_metadata_is_empty_dict():
    assert sh.parse(save({"x": torch.ones(2)})).metadata == {}


@pytest.mark.parametrize("keep", [0, 3, 7])
def test_shorter_than_the_length_prefix(keep):
    with pytest.raises(sh.HeaderTruncated, match="truncated safetensors header"):
        sh.parse(_good()[:keep])


@pytest.mark.parametrize("keep", [8, 20, -4])
def test_truncated_file(keep, tmp_path):
    data = _good()
    cut = data[:keep]
    err = sh.TensorBeyondFile if keep < 0 else sh.HeaderTruncated
    with pytest.raises(err) as e:
        sh.parse(cut)
    assert "exceeds the file" in str(e.value) or "truncated" in str(e.value)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(cut)
    with pytest.raises(err):
        sh.read(path)


@pytest.mark.parametrize("length", [2**64 - 1, 1 << 40])
def test_absurd_length(length, tmp_path):
    data = struct.pack("<Q", length) + b"{}"
    with pytest.raises(sh.HeaderTruncated, match=f"length {length} exceeds the file"):
        sh.parse(data)
    path = tmp_path / "absurd.safetensors"
    path.write_bytes(data)
    with pytest.raises(sh.HeaderTruncated):  # refused before any read of that size is attempted
        sh.read(path)
    assert not sh.looks_like_safetensors(data, len(data))


def test_length_beyond_the_bound():
    data = _good()
    with pytest.raises(sh.HeaderTooLarge, match="larger than the limit of 16"):
        sh.parse(data, max_header=16)


@pytest.mark.parametrize("raw", [b"\xff\xfe!!!!!!", b'{"a": ', b"[1, 2, 3]", b'{"a": NaN}', b"[" * 200 + b"]" * 200])
def test_bad_json(raw):
    with pytest.raises(sh.HeaderNotJSON, match="corrupt safetensors header"):
        sh.parse(struct.pack("<Q", len(raw)) + raw)


@pytest.mark.parametrize("edit,err,needle", [
    (lambda h: h["a"].update(dtype="Q4"), sh.HeaderEntryError, "unknown dtype 'Q4'"),
    (lambda h: h["a"].update(dtype=5), sh.HeaderEntryError, "dtype must be a string"),
    (lambda h: h["a"].update(dtype="F16"), sh.HeaderEntryError, "but 24 data bytes"),
    (lambda h: h["a"].update(shape=[2, "3"]), sh.HeaderEntryError, "shape[1] must be an integer"),
    (lambda h: h["a"].update(shape=[4, 3]), sh.HeaderEntryError, "but 24 data bytes"),
    (lambda h: h["a"].update(data_offsets=[0]), sh.HeaderEntryError, "no valid data offsets"),
    (lambda h: h["a"].update(data_offsets=[8, 4]), sh.TensorBeyondFile, "beyond the end of the file"),
    (lambda h: h["b"].update(data_offsets=[24, 10**6]), sh.TensorBeyondFile, "needs 1000000 data bytes"),
    (lambda h: h.update(c=[1]), sh.HeaderEntryError, "tensor 'c' must be an object"),
    (lambda h: h.update(__metadata__={"k": 5}), sh.HeaderEntryError, "__metadata__.k must be a string"),
    (lambda h: h.update(__metadata__=[1]), sh.HeaderEntryError, "__metadata__ must be an object"),
])
def test_bad_entries(edit, err, needle):
    data = _good()
    header = _header_of(data)
    edit(header)
    with pytest.raises(err) as e:
        sh.parse(_with_header(data, header))
    assert needle in str(e.value), str(e.value)


def test_errors_are_one_family():
    for cls in (sh.HeaderTruncated, sh.HeaderTooLarge, sh.HeaderNotJSON, sh.HeaderEntryError, sh.TensorBeyondFile):
        assert issubclass(cls, sh.HeaderError) and issubclass(cls, ValueError)
    assert issubclass(sh.TensorBeyondFile, sh.HeaderEntryError)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        sh.read(tmp_path / "absent.safetensors")
