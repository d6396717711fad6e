"""Housekeeping's pass over stored objects, on doubles: it checks and deletes as the listing streams."""

from __future__ import annotations

from collections.abc import Iterator

from overnight.batches.housekeeping import OrphanSightings, collect_garbage
from overnight.files.memory import MemoryFileStore


class Catalog:
    """No rows name anything; records how far the listing had gone at each check."""

    def __init__(self, listed: list[int]) -> None:
        self.listed = listed
        self.checked_at: list[int] = []

    def collect_garbage(self, now: int) -> list[str]:
        return []

    def live_storage_keys(self, keys: list[str]) -> set[str]:
        self.checked_at.append(self.listed[0])
        return set()

    def batch_status(self, batch_id: str) -> str | None:
        return None


class Listing(MemoryFileStore):
    def __init__(self, listed: list[int], keys: int) -> None:
        super().__init__()
        self.listed, self.keys, self.deleted = listed, keys, 0

    def list_keys(self, prefix: str, older_than: float) -> Iterator[str]:
        for i in range(self.keys if prefix == "files/" else 0):
            self.listed[0] += 1
            yield f"files/file-{i}"

    def delete(self, key: str) -> None:
        self.deleted += 1


def test_a_pass_checks_and_deletes_500_keys_at_a_time_as_they_are_listed() -> None:
    """Past the orphan age every stored object is listed each pass: held in one list first, a
    store's every key was in memory at once."""
    listed = [0]
    catalog, files = Catalog(listed), Listing(listed, 1_200)
    assert collect_garbage(catalog, files, now=1e10) == 1_200  # type: ignore[arg-type]
    assert catalog.checked_at == [500, 1_000, 1_200] and files.deleted == 1_200


class Naming(Catalog):
    """Rows name exactly the keys in `named`."""

    def __init__(self) -> None:
        super().__init__([0])
        self.named: set[str] = set()

    def live_storage_keys(self, keys: list[str]) -> set[str]:
        return self.named & set(keys)


def test_an_orphan_is_one_that_two_passes_find_unnamed() -> None:
    """On AWS a multipart object's LastModified is its upload's start: one written over more than
    the orphan age looks old before the commit that names it. A pass between the write and the
    commit must not delete it; the next pass deletes what is still unnamed."""
    catalog, files = Naming(), MemoryFileStore()
    for key in ("files/file-published", "files/file-orphan"):
        with files.writer(key) as writer:
            writer.write(b"x")
    sightings = OrphanSightings()
    assert collect_garbage(catalog, files, now=1e10, sightings=sightings) == 0  # type: ignore[arg-type]
    assert sightings.keys == {"files/file-published", "files/file-orphan"}
    catalog.named.add("files/file-published")  # its row commits
    assert collect_garbage(catalog, files, now=1e10, sightings=sightings) == 1  # type: ignore[arg-type]
    assert files.exists("files/file-published") and not files.exists("files/file-orphan")
    assert sightings.keys == set()


def test_orphan_sightings_are_bounded() -> None:
    catalog, files = Naming(), MemoryFileStore()
    for i in range(30):
        with files.writer(f"files/file-{i}") as writer:
            writer.write(b"x")
    sightings = OrphanSightings(bound=10)
    assert collect_garbage(catalog, files, now=1e10, sightings=sightings) == 0  # type: ignore[arg-type]
    assert len(sightings.keys) == 10
    assert collect_garbage(catalog, files, now=1e10, sightings=sightings) == 10  # type: ignore[arg-type]
    assert len(sightings.keys) == 10  # the next ten, deleted by the pass after
