"""The llama.cpp handles (through llama-cpp-python's ctypes bindings) and llama.cpp's log routing.

One `Native` holds the model, its vocabulary, the one context (all sequence slots) and the reusable
batch. Only the scheduler's decode thread touches the context; see scheduler.py for why the context is
configured as it is (a KV stream per slot, flash attention; keys and values in 8 bits in deterministic
mode).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
from typing import Any

import llama_cpp
import numpy as np

from overnight.engines.llama import kv_budget

log = logging.getLogger(__name__)

N_UBATCH = 512

_LLAMA_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level: 3 WARN, 4 ERROR
# What llama.cpp says about a decode that the scheduler aborted (Native.abort): expected, not news.
_ABORT_MESSAGES = (b"failed with error 1", b"compute status: 1", b"failed to decode, ret = 2", b"removing memory module entries")


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]  # a ctypes CFUNCTYPE
def llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """Route llama.cpp's own messages to Python logging: warnings and errors only, the load chatter
    (hundreds of INFO lines per model) would drown the server log."""
    py_level = _LLAMA_LOG_LEVELS.get(level)
    if py_level is not None and any(m in text for m in _ABORT_MESSAGES):
        py_level = logging.DEBUG
    if py_level is not None:
        log.log(py_level, "llama.cpp: %s", text.decode("utf-8", errors="replace").rstrip())



# Bytes per key or value number in the cache: f16 (llama.cpp's default), or q8_0 (blocks of 32 int8
# and one f16 scale: 34 bytes per 32) in deterministic mode.
_KV_VALUE_BYTES = {False: 2.0, True: 34 / 32}


def kv_cell_bytes(model: Any, quantized: bool = False) -> int:
    """Bytes one token takes in the KV cache of every layer (f16 keys and values, or q8_0 where
    `quantized`). Sliding-window layers (Gemma 3) hold fewer cells: an overestimate there."""
    n_head = llama_cpp.llama_model_n_head(model)
    head = llama_cpp.llama_model_n_embd(model) // max(n_head, 1)
    arch = _metadata(model, "general.architecture")
    key = int(_metadata(model, f"{arch}.attention.key_length") or head)
    value = int(_metadata(model, f"{arch}.attention.value_length") or head)
    layers = llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model)
    return int(layers * (key + value) * _KV_VALUE_BYTES[quantized])


def cpu_features(system_info: str | None = None) -> frozenset[str]:
    """The CPU features this build of llama.cpp uses ("AVX2", "AVX512_BF16", ...), from its
    "CPU : SSE3 = 1 | AVX2 = 1 | ... |" summary (llama_print_system_info, or the one given)."""
    if system_info is None:
        system_info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    return frozenset(name.strip().removeprefix("CPU : ") for name, _, value in
                     (item.partition("=") for item in system_info.split("|")) if value.strip() == "1")


def _warn_if_untested_cpu(system_info: str) -> None:
    """Deterministic mode's promise is reasoned from, and tested on, x86 CPUs with AVX2 or AVX-512.
    Elsewhere llama.cpp picks matrix kernels by the number of rows in a call that sum a row
    differently: ARM with int8 matrix instructions (MATMUL_INT8: a two-row kernel for even row
    counts; NEON repacks Q4_0 and Q8_0), Intel AMX tiles for more than one row, AVX without AVX2."""
    features = cpu_features(system_info)
    risky = features & {"AMX_INT8", "MATMUL_INT8"}
    if "AVX2" not in features or risky:
        log.warning("deterministic mode is tested on x86 CPUs with AVX2 or AVX-512; on this one (%s) "
                    "llama.cpp's matrix kernels may sum a row differently with the number of rows "
                    "decoded together, and a greedy answer may then vary with batching",
                    ", ".join(sorted(risky)) or "no AVX2")


def _metadata(model: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None


class Native:
    """The model, its vocabulary, the one context and the reusable batch. Tokenizing touches only the
    (read-only) vocabulary and is safe from any thread; everything else belongs to the decode thread."""

    def __init__(self, model_path: str, n_ctx: int, n_seq_max: int, threads: int, *, deterministic: bool = False,
                 kv_unified: bool = False) -> None:
        llama_cpp.llama_log_set(llama_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        if deterministic:
            # Its promise rests on ggml's CPU kernels (below): no layer goes to a GPU backend (a
            # build with Metal or CUDA offloads every layer by default).
            model_params.n_gpu_layers = 0
            _warn_if_untested_cpu(llama_cpp.llama_print_system_info().decode("utf-8", "replace"))
        model = llama_cpp.llama_model_load_from_file(model_path.encode(), model_params)
        if not model:
            raise RuntimeError(f"llama.cpp could not load the model {model_path!r}")
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        # Fewer slots, each with its cells, when the KV cache would not fit in memory (kv_budget.py).
        cells_per_slot = n_ctx // n_seq_max
        cell_bytes = kv_cell_bytes(model, deterministic)
        available = kv_budget.available_memory_bytes()
        slots = kv_budget.slots_that_fit(n_seq_max, cells_per_slot, cell_bytes, available)
        if slots < n_seq_max:
            assert available is not None
            log.warning("the KV cache of %d slots x %d cells (%.1f GB) does not fit in the %.1f GB of memory "
                        "available: running %d slots (lower [embedded] n_seq_max, or give it more memory)",
                        n_seq_max, cells_per_slot, n_seq_max * cells_per_slot * cell_bytes / 1e9, available / 1e9,
                        slots)
            n_seq_max, n_ctx = slots, cells_per_slot * slots
        self.n_seq_max = n_seq_max
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = max(N_UBATCH, 2048)
        params.n_ubatch = N_UBATCH
        params.n_seq_max = n_seq_max
        # Both modes run a KV stream per slot (kv_unified False): a sequence then attends over its own
        # cells only; on one unified cache every query also walks the other sequences' cells (masked),
        # and generation at 32 sequences ran ~20% slower (llama-batched-bench, -kvu). The price is
        # llama.cpp's micro-batches for streams (consecutive sequence ids, equally many tokens each),
        # which the scheduler's step layout and compaction work with (scheduler.py). The unified
        # cache stays available for experiments (bench_embedded --levers).
        params.kv_unified = kv_unified
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        # Flash attention: ~20% faster generation at 32 sequences (llama-batched-bench, issue 14).
        params.flash_attn_type = 1
        if deterministic:
            # Keys and values in q8_0. ggml's CPU flash attention then computes every query row alone
            # over the row's cells in order, whatever else the call holds. On an f16 cache it has two
            # faster paths that do not: a tiled kernel for calls of many rows per sequence (prompt
            # chunks) and, for one row of one sequence over 512+ cells (a line generating alone in a
            # long context), the cells split between threads and the partial sums added afterwards.
            # With every other operation a per-row computation too (on x86 with AVX2 or AVX-512, for
            # the formats in packaged_models.ROW_STABLE_FORMATS), a token's numbers do not depend on
            # the call it is decoded in, nor on whether its prefix was decoded in a copy in another
            # slot (scheduler.py, Determinism).
            params.type_k = params.type_v = llama_cpp.GGML_TYPE_Q8_0
            params.op_offload = False  # nothing computed on a GPU backend either
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise RuntimeError("llama.cpp could not create a context (not enough memory for the KV cache?)")
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_batch = llama_cpp.llama_n_batch(ctx)
        train = llama_cpp.llama_model_n_ctx_train(model)
        # Each slot's share, in both layouts: n_seq_max slots (busy or holding a reusable prefix)
        # then never need more than n_ctx cells together, so a unified cache cannot run out.
        per_seq = min(llama_cpp.llama_n_ctx_seq(ctx), n_ctx // n_seq_max)
        self.window = min(per_seq, train) if train > 0 else per_seq
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._piece_buf = ctypes.create_string_buffer(256)
        # Aborting the decode in flight (another thread calls `abort`). ggml's CPU backend asks
        # `callback(data)` after every graph node, on a compute thread that does not hold the GIL: a
        # Python callback would take the GIL hundreds of times per step and wait for the event loop
        # each time. The callback is libc's `strlen` on a two-byte buffer, `flag` NUL: it returns 0
        # or 1, which the C ABI (x86-64, AArch64) reads as the `bool` the callback type returns.
        self._abort_flag = ctypes.create_string_buffer(2)
        address = ctypes.cast(ctypes.CDLL(None).strlen, ctypes.c_void_p).value
        assert address is not None
        self._abort_callback = llama_cpp.ggml_abort_callback(address)
        llama_cpp.llama_set_abort_callback(ctx, self._abort_callback,
                                           ctypes.cast(self._abort_flag, ctypes.c_void_p))

    def abort(self) -> None:
        """Any thread: make the decode in flight (or the next one) stop after its current graph node;
        `llama_decode` then returns 2 and llama.cpp removes that step's tokens from the KV cache."""
        self._abort_flag[0] = b"\x01"

    def clear_abort(self) -> None:
        self._abort_flag[0] = b"\x00"

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:  # cannot happen with one token per byte + specials, but follow the API
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    @functools.cached_property
    def special_texts(self) -> re.Pattern[str] | None:
        """What tokenizing with parse_special reads as a special token: the texts of the vocabulary's
        control, user-defined and unknown tokens (llama.cpp's `cache_special_tokens`), or None."""
        kinds = (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
                 | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN)
        texts = set()
        for token in range(self.n_vocab):
            if llama_cpp.llama_vocab_get_attr(self.vocab, token) & kinds:
                text = (llama_cpp.llama_vocab_get_text(self.vocab, token) or b"").decode("utf-8", "replace")
                if text:
                    texts.add(text)
        if not texts:
            return None
        return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))

    def piece(self, token: int, special: bool = False) -> bytes:
        """Decode-thread only (shared buffer)."""
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    def special_text(self, token: int) -> str:
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def argmax(self, batch_index: int) -> int:
        # numpy argmax over the logits row: much cheaper than a native sampler chain for greedy.
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, batch_index), shape=(self.n_vocab,))
        return int(row.argmax())

    def free(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

