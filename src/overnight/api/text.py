"""Text a JSON body may carry but nothing downstream can store or send: lone UTF-16 surrogates.

JSON allows `"\\ud800"` (an escape of half a surrogate pair); Python's json parser accepts it, and
the string then fails wherever it is encoded as UTF-8 (the database, orjson, a file). Such input
is refused at the edge with a 400 that names the field, never a 500 later."""

from __future__ import annotations

import re
from typing import Any

from overnight.batches.errors import InvalidRequest

_SURROGATE = re.compile("[\ud800-\udfff]")


def reject_lone_surrogates(value: Any, param: str = "") -> None:
    """Raise `InvalidRequest` naming the first field (or key) that holds a lone surrogate."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise InvalidRequest(
                f"Invalid value for '{param or 'body'}': the string contains a lone UTF-16 surrogate "
                "(an escape such as \\ud800 without its pair), which is not valid Unicode text.",
                param=param or None,
                code="invalid_value",
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            reject_lone_surrogates(key, param)
            reject_lone_surrogates(item, f"{param}.{key}" if param else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            reject_lone_surrogates(item, f"{param}[{index}]")
