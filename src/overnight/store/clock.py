"""The database's clock, for leases and deadlines: every worker compares against one clock, so a
machine whose clock runs ahead cannot take over a live lease, nor one that runs behind keep a dead
one. Statements take `p_now` when a caller passes a time (tests move time by hand) and the
database's own time otherwise."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Float, bindparam, func
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement


class database_now(FunctionElement[float]):
    """The database server's current time in epoch seconds: the statement's start, so a whole
    statement sees one time, and not the transaction's start, which can be long past."""

    type = Float()
    inherit_cache = True


@compiles(database_now, "postgresql")
def _postgresql_now(_element: database_now, _compiler: Any, **_kw: Any) -> str:
    return "CAST(EXTRACT(EPOCH FROM statement_timestamp()) AS DOUBLE PRECISION)"


@compiles(database_now, "sqlite")
def _sqlite_now(_element: database_now, _compiler: Any, **_kw: Any) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


# `p_now` when bound to a time, else the database's clock.
LEASE_NOW = func.coalesce(bindparam("p_now", type_=Float), database_now())
