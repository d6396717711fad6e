"""The GGUF header reader deterministic mode checks a configured model with: the formats of its
matrices, vectors left out, metadata of every kind skipped, every part of a split model read, a
broken file named."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from overnight.engines.llama.gguf_header import NotGGUF, matrix_types


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _tensor(name: str, dims: tuple[int, ...], ggml_type: int) -> bytes:
    return _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, 0)


def gguf(version: int = 3, split: tuple[int, int] | None = None, tensors: list[bytes] | None = None) -> bytes:
    """A GGUF header; `split`: (this part's index, parts), as llama.cpp's gguf-split writes them."""
    metadata = [
        _string("general.architecture") + struct.pack("<I", 8) + _string("llama"),
        _string("llama.context_length") + struct.pack("<IQ", 10, 2048),  # u64
        _string("general.file_type") + struct.pack("<Ii", 5, 7),  # i32
        _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + b"".join(_string(t) for t in "abc"),
        _string("tokenizer.ggml.scores") + struct.pack("<IIQ3f", 9, 6, 3, 0.0, 1.0, 2.0),
    ]
    if split is not None:
        metadata += [_string("split.no") + struct.pack("<IH", 3, split[0]),  # u16
                     _string("split.count") + struct.pack("<IH", 3, split[1]),
                     _string("split.tensors.count") + struct.pack("<Ii", 5, 99)]  # i32
    tensors = tensors if tensors is not None else [
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


def test_every_part_of_a_split_model_is_read(tmp_path: Path) -> None:
    """Only the first part was read: a split model whose later parts hold Q5_0 matrices passed
    deterministic mode's check with its first part's Q8_0 alone."""
    q8, q5 = _tensor("a.weight", (576, 576), 8), _tensor("b.weight", (576, 576), 6)
    for i, tensors in enumerate([[q8, q8], [q8], [q5, q5, q5]]):
        (tmp_path / f"m-{i + 1:05d}-of-00003.gguf").write_bytes(gguf(split=(i, 3), tensors=tensors))
    assert matrix_types(str(tmp_path / "m-00001-of-00003.gguf")) == {"Q8_0": 3, "Q5_0": 3}
    (tmp_path / "m-00002-of-00003.gguf").unlink()
    with pytest.raises(NotGGUF, match=r"m-00002-of-00003.gguf, part 2 of the split model .*: No such file"):
        matrix_types(str(tmp_path / "m-00001-of-00003.gguf"))
    (tmp_path / "renamed.gguf").write_bytes(gguf(split=(0, 3)))
    with pytest.raises(NotGGUF, match=re.escape("one of 3 parts of a split model; name the first, PREFIX-00001-of-00003.gguf")):
        matrix_types(str(tmp_path / "renamed.gguf"))


def test_a_metadata_key_of_absurd_length_is_named_not_allocated(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf()[:24] + struct.pack("<Q", 2**60))
    with pytest.raises(NotGGUF, match="a metadata key of 1152921504606846976 bytes"):
        matrix_types(str(path))
