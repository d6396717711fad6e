"""Valid JSON that orjson refuses, read by the standard library: numbers beyond a double (`1e400`,
400 digits) and lone surrogate escapes. Input lines and upstream answers are passed on as the bytes
they came as; this parse only serves to check and read them."""

from __future__ import annotations

import json
from typing import Any


def loads_standard(data: bytes) -> Any:
    """The standard library's parse, refusing its extensions (NaN, Infinity): ValueError if the
    text is not JSON."""
    return json.loads(data, parse_constant=_not_json)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")
