"""The GGUF header reader deterministic mode checks a configured model with: the formats of its
matrices, vectors left out, metadata of every kind skipped, a broken file named."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from overnight.engines.llama.gguf_header import NotGGUF, matrix_types


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _tensor(name: str, dims: tuple[int, ...], ggml_type: int) -> bytes:
    return _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, 0)


def gguf(version: int = 3) -> bytes:
    metadata = [
        _string("general.architecture") + struct.pack("<I", 8) + _string("llama"),
        _string("llama.context_length") + struct.pack("<IQ", 10, 2048),  # u64
        _string("general.file_type") + struct.pack("<Ii", 5, 7),  # i32
        _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + b"".join(_string(t) for t in "abc"),
        _string("tokenizer.ggml.scores") + struct.pack("<IIQ3f", 9, 6, 3, 0.0, 1.0, 2.0),
    ]
    tensors = [
        _tensor("token_embd.weight", (576, 49152), 8),  # Q8_0
        _tensor("blk.0.attn_norm.weight", (576,), 0),  # a vector: not a matrix
        _tensor("blk.0.attn_q.weight", (576, 576), 6),  # Q5_0
        _tensor("blk.0.ffn_up.weight", (576, 1536), 6),
        _tensor("blk.0.bias", (576, 1), 0),  # a matrix of one column is a vector
        _tensor("blk.0.odd", (8, 8), 99),
    ]
    return (b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata)) + b"".join(metadata)
            + b"".join(tensors) + b"\0" * 64)


def test_the_formats_of_a_files_matrices_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf())
    assert matrix_types(str(path)) == {"Q8_0": 1, "Q5_0": 2, "type 99": 1}


@pytest.mark.parametrize(("data", "says"), [
    (b"PK\x03\x04" + gguf()[4:], "is not a GGUF file"),
    (gguf(version=1), "GGUF version 1 is not one this reader knows"),
    (gguf()[:200], "the GGUF header ends early"),
    (gguf()[:24] + _string("k") + struct.pack("<I", 13), "unknown GGUF metadata type 13"),
    (gguf().replace(_tensor("blk.0.odd", (8, 8), 99), _string("x") + struct.pack("<I", 2**31)),
     "a tensor of 2147483648 dimensions"),  # was a read of 16 GiB
])
def test_a_file_that_is_not_a_whole_gguf_header_is_named(tmp_path: Path, data: bytes, says: str) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    with pytest.raises(NotGGUF, match=says):
        matrix_types(str(path))
