"""Finalize copies results objects by byte range: the output section, then the error section,
whatever the chunk boundaries; results written before sections existed (tagged lines) still read."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from overnight.batches.finalize import _copy_sections, _copy_tagged_lines
from overnight.files.memory import MemoryFileStore


class ChoppyStore(MemoryFileStore):
    """Hands out objects in chunks of a few bytes, so section boundaries fall inside chunks."""

    def __init__(self, chunk: int) -> None:
        super().__init__()
        self.chunk = chunk

    def iter_chunks(self, key: str, chunk_size: int = 0) -> Iterator[bytes]:
        yield from super().iter_chunks(key, self.chunk)


OUTPUT = b'{"custom_id":"a","n":1}\n{"custom_id":"b","n":2}\n{"custom_id":"c","n":3}\n'
ERRORS = b'{"custom_id":"d","error":{}}\n{"custom_id":"e","error":{}}\n'


@pytest.mark.parametrize("chunk", [1, 7, len(OUTPUT), len(OUTPUT) + 1, 1 << 20])
@pytest.mark.parametrize(("output", "errors"), [(OUTPUT, ERRORS), (OUTPUT, b""), (b"", ERRORS)])
def test_sections_land_in_their_files_for_any_chunking(chunk: int, output: bytes, errors: bytes) -> None:
    files = ChoppyStore(chunk)
    with files.writer("results/x") as w:
        w.write(output + errors)
    with files.writer("out") as out, files.writer("err") as err:
        counts = _copy_sections(files, "results/x", len(output), out, err)
    assert files.blobs["out"][0] == output
    assert files.blobs["err"][0] == errors
    assert counts == (output.count(b"\n"), errors.count(b"\n"))


def test_tagged_results_of_an_older_build_are_split_by_tag() -> None:
    files = ChoppyStore(5)
    tagged = b'O{"custom_id":"a"}\nE{"custom_id":"b"}\nO{"custom_id":"c"}\n'
    with files.writer("results/old") as w:
        w.write(tagged)
    with files.writer("out") as out, files.writer("err") as err:
        counts = _copy_tagged_lines(files, "results/old", out, err)
    assert files.blobs["out"][0] == b'{"custom_id":"a"}\n{"custom_id":"c"}\n'
    assert files.blobs["err"][0] == b'{"custom_id":"b"}\n'
    assert counts == (2, 1)
