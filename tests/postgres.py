"""PostgreSQL fixtures (conftest.py imports them).

The tests start their own server once per session (overnight.testing.postgres: initdb in a temp
dir, `postgres` as the unprivileged `postgres` user on 127.0.0.1, fsync off) and stop it at the
end, whatever happened; OVERNIGHT_TEST_DATABASE_URL=postgresql+psycopg://user@host:port/db uses
a server of yours instead (the user needs CREATEDB). Every database is a fresh copy of a template
that the migrations brought to head once: CREATE DATABASE ... TEMPLATE takes ~50 ms (up to ~450 ms
on a busy machine), where migrating an empty database takes ~200-700 ms. Emptying a database
(TRUNCATE) takes ~20 ms, so per-test isolation reuses the module's database.

    postgres_server      session  the PostgresServer (create_database, empty_database, drop_database, url)
    postgres_template    session  the template database's name (migrated to head)
    postgres_module_url  module   a SQLAlchemy URL of a fresh migrated database for the module
    postgres_clean_url   function postgres_module_url with every table emptied (ids restarted) first
    postgres_url         function a fresh migrated database of its own (CREATE DATABASE per test)
    postgres_empty_url   function a fresh empty database (no tables): for migration tests
    database_url         function parametrized: [sqlite] a file in tmp_path (empty), [postgresql]
                                  postgres_clean_url; call SqlStore(url).migrate() on either

Every PostgreSQL parametrization carries the `postgres` marker: `-m "not postgres"` runs without it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from overnight.store.sql import SqlStore
from overnight.testing.postgres import PostgresServer, PostgresUnavailable

URL_VARIABLE = "OVERNIGHT_TEST_DATABASE_URL"

# Parametrize a fixture or a test over both dialects with these.
DIALECTS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    url = os.environ.get(URL_VARIABLE)
    if url:
        server = PostgresServer.external(url)
        try:
            yield server
        finally:
            server.drop_created()
        return
    try:
        server = PostgresServer.start()
    except PostgresUnavailable as exc:
        pytest.fail(f"{exc}\n(or deselect the PostgreSQL tests: -m 'not postgres')", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_template(postgres_server: PostgresServer) -> str:
    name = postgres_server.unique_name("overnight_template")
    store = SqlStore(postgres_server.create_database(name))
    try:
        store.migrate()
    finally:
        store.close()  # a template must have no sessions when it is copied
    return name


def _fresh_database(server: PostgresServer, template: str | None, prefix: str) -> Iterator[str]:
    name = server.unique_name(prefix)
    url = server.create_database(name, template=template)
    try:
        yield url
    finally:
        server.drop_database(name)  # WITH (FORCE): a store the test did not close is no obstacle


@pytest.fixture(scope="module")
def postgres_module_url(postgres_server: PostgresServer, postgres_template: str) -> Iterator[str]:
    yield from _fresh_database(postgres_server, postgres_template, "overnight_module")


@pytest.fixture
def postgres_clean_url(postgres_server: PostgresServer, postgres_module_url: str) -> str:
    database = make_url(postgres_module_url).database
    assert database is not None
    postgres_server.empty_database(database)
    return postgres_module_url


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, postgres_template: str) -> Iterator[str]:
    yield from _fresh_database(postgres_server, postgres_template, "overnight_test")


@pytest.fixture
def postgres_empty_url(postgres_server: PostgresServer) -> Iterator[str]:
    yield from _fresh_database(postgres_server, None, "overnight_empty")


@pytest.fixture(params=DIALECTS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_clean_url")
        return url
    return f"sqlite:///{tmp_path / 'db.sqlite'}"


def expect_failures_on_postgres(request: pytest.FixtureRequest, url: str, known: Mapping[str, str]) -> None:
    """Mark this test xfail(strict=True) when it runs on PostgreSQL and is in `known` (test name ->
    why it fails there): a fix then shows up as an XPASS failure, and the entry must go."""
    name = getattr(request.node, "originalname", request.node.name)
    if url.startswith("postgresql") and name in known:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"PostgreSQL: {known[name]}"))


@pytest.fixture(params=DIALECTS)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database with no tables at all, on each dialect."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_empty_url")
        return url
    return f"sqlite:///{tmp_path / 'db.sqlite'}"


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    """A migrated store on each dialect, closed afterwards."""
    s = SqlStore(database_url)
    s.migrate()
    yield s
    s.close()
