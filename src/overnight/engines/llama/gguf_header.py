"""What a GGUF file's matrices are stored in, read from its header (llama.cpp's API does not say).

Deterministic mode needs it: its promise holds only where every matrix product sums a row the same
whatever else the call holds, which depends on the format's CPU kernels (scheduler.py, Determinism).
The header is read as the GGUF spec lays it out (version 2 and 3, little-endian): magic, version,
tensor and metadata counts, the metadata (skipped), then one record per tensor: name, dimensions,
type, offset. Only the headers are read, not the weights: of every part of a split model, found as
llama.cpp finds them (the first part's `split.count`, the parts named PREFIX-0000i-of-0000n.gguf).
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import BinaryIO

# ggml_type ids (ggml.h) of the formats the tests decode; other ids are named by number.
TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K",
              12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 20: "IQ4_NL", 23: "IQ4_XS", 30: "BF16"}
# Metadata value types (gguf_type) of fixed size, in bytes; 8 is a string, 9 an array.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_U16 = 3
# Metadata keys are short names ("general.architecture"); a longer one is a broken header, not a
# reason to allocate its claimed length.
_MAX_KEY_BYTES = 1 << 16


class NotGGUF(ValueError):
    pass


def matrix_types(path: str) -> Counter[str]:
    """How many tensors of two or more dimensions (the matrices: what matrix products read) each
    format holds, in every part of a split model. Vectors (norms, biases) are left out: they are not
    multiplied as matrices."""
    found, parts = _header(path)
    if parts > 1:
        first = f"-00001-of-{parts:05d}.gguf"  # llama.cpp's llama_split_prefix
        if not path.endswith(first):
            raise NotGGUF(f"{path} is one of {parts} parts of a split model; name the first, PREFIX{first}")
        for i in range(2, parts + 1):
            part = f"{path.removesuffix(first)}-{i:05d}-of-{parts:05d}.gguf"
            try:
                found += _header(part)[0]
            except OSError as exc:
                raise NotGGUF(f"{part}, part {i} of the split model {path}: {exc.strerror}") from None
    return found


def _header(path: str) -> tuple[Counter[str], int]:
    """One file's matrix formats, and the parts its model is split into (1 if not split)."""
    parts = 1
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise NotGGUF(f"{path} is not a GGUF file")
        version, n_tensors, n_metadata = struct.unpack("<IQQ", _exactly(fh, 20))
        if version not in (2, 3):
            raise NotGGUF(f"{path}: GGUF version {version} is not one this reader knows (2, 3)")
        for _ in range(n_metadata):
            (length,) = struct.unpack("<Q", _exactly(fh, 8))
            if length > _MAX_KEY_BYTES:
                raise NotGGUF(f"{path}: a metadata key of {length} bytes")
            key, value_type = _exactly(fh, length), _u32(fh)
            if key == b"split.count" and value_type == _U16:
                (parts,) = struct.unpack("<H", _exactly(fh, 2))
            else:
                _skip_value(fh, value_type)
        found: Counter[str] = Counter()
        for _ in range(n_tensors):
            _skip_string(fh)  # the name
            n_dims = _u32(fh)
            if n_dims > 4:  # GGML_MAX_DIMS
                raise NotGGUF(f"{path}: a tensor of {n_dims} dimensions (at most 4)")
            dims = struct.unpack(f"<{n_dims}Q", _exactly(fh, 8 * n_dims))
            ggml_type = _u32(fh)
            _exactly(fh, 8)  # the data's offset
            if sum(1 for d in dims if d > 1) >= 2:
                found[TYPE_NAMES.get(ggml_type, f"type {ggml_type}")] += 1
        return found, parts


def _exactly(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise NotGGUF(f"{fh.name}: the GGUF header ends early")
    return data


def _u32(fh: BinaryIO) -> int:
    return int(struct.unpack("<I", _exactly(fh, 4))[0])


def _skip_string(fh: BinaryIO) -> None:
    (length,) = struct.unpack("<Q", _exactly(fh, 8))
    fh.seek(length, 1)


def _skip_value(fh: BinaryIO, value_type: int) -> None:
    if value_type in _FIXED:
        fh.seek(_FIXED[value_type], 1)
    elif value_type == _STRING:
        _skip_string(fh)
    elif value_type == _ARRAY:
        item_type = _u32(fh)
        (count,) = struct.unpack("<Q", _exactly(fh, 8))
        if item_type in _FIXED:
            fh.seek(_FIXED[item_type] * count, 1)
        else:  # strings (a tokenizer's vocabulary) or nested arrays: one at a time
            for _ in range(count):
                _skip_value(fh, item_type)
    else:
        raise NotGGUF(f"{fh.name}: unknown GGUF metadata type {value_type}")
