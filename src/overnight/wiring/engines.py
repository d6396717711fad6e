"""Engines and the router, from settings: what a process that runs lines builds (and the API, to
list models; it never starts them)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from overnight import constants as C
from overnight.engines.port import Engine
from overnight.engines.router import Route, Router
from overnight.engines.upstream import UpstreamEngine
from overnight.settings import Settings
from overnight.wiring.core import ConfigurationError

log = logging.getLogger("overnight")


def build_router(settings: Settings) -> Router:
    routes: list[Route] = []
    for upstream in settings.upstreams:
        if upstream.ca_file is not None:
            _check_ca_file(upstream.ca_file)
        upstream_engine = UpstreamEngine(upstream)
        routes.extend(Route(pattern, upstream_engine) for pattern in upstream.models)
    defaults: dict[str, Engine] = {}
    if settings.embedded.enabled:
        defaults = embedded_engines(settings)
        # An embedded model is also routable by its own name, fallback or not.
        for endpoint, engine in defaults.items():
            for name in engine.served_models():
                routes.append(Route(name, engine, frozenset({endpoint})))
        gemma = gemma_engine(settings)
        if gemma is not None:
            routes.extend(Route(name, gemma, frozenset({C.CHAT_COMPLETIONS, C.COMPLETIONS, C.RESPONSES}))
                          for name in gemma.served_models())
    if not settings.fallback_to_default:
        defaults = {}
    return Router(routes, settings.aliases, defaults)


def embedded_engines(settings: Settings) -> dict[str, Engine]:
    """endpoint -> embedded engine, for the engines whose code and model are installed."""
    engines: dict[str, Engine] = {}
    try:
        from overnight.engines import packaged_models
        from overnight.engines.embeddings import MiniLMEmbeddingEngine
        from overnight.engines.llama import LlamaChatEngine
    except ImportError as exc:  # the `embedded` extra is not installed
        log.warning("embedded engines unavailable (%s); only configured upstreams serve requests", exc)
        return engines
    cfg = settings.embedded
    weights = chat_weights(cfg.weights, cfg.chat_model_path, cfg.deterministic)  # a conflict first: it is what to fix
    if cfg.chat_model_path:
        _check_gguf(cfg.chat_model_path)
        if cfg.deterministic:
            _check_row_stable(cfg.chat_model_path)
    if cfg.embedding_model_dir:
        _check_embedding_dir(cfg.embedding_model_dir)
    chat_path = cfg.chat_model_path or packaged_models.default_chat_model_path()
    if chat_path:
        name = cfg.chat_model_name or (
            packaged_models.DEFAULT_CHAT_MODEL_NAME if not cfg.chat_model_path else _stem(chat_path)
        )
        if weights is not None:
            # The packaged Q4_1 file in a format with fast CPU kernels (packaged_models.py).
            chat_path = packaged_models.fast_chat_model_path(chat_path, settings.resolved_models_dir, weights)
        chat = LlamaChatEngine(chat_path, name, n_ctx=cfg.n_ctx, n_seq_max=cfg.n_seq_max,
                               threads=cfg.threads or compute_threads(settings.worker_processes),
                               deterministic=cfg.deterministic)
        engines[C.CHAT_COMPLETIONS] = chat
        engines[C.COMPLETIONS] = chat
        engines[C.RESPONSES] = chat  # client.responses.create(...) bodies work with zero configuration
    embed_dir = cfg.embedding_model_dir or packaged_models.default_embedding_model_dir()
    if embed_dir:
        engines[C.EMBEDDINGS] = MiniLMEmbeddingEngine(embed_dir, threads=cfg.threads)
    return engines


def compute_threads(worker_processes: int) -> int:
    """llama.cpp threads per worker process when `[embedded] threads` is not set: the CPUs this
    process may run on (its affinity: a container's or taskset's, not the host's count), shared
    between the worker processes that each load the model. (Every process took every core: with 2
    workers on 2 cores, 4 spinning compute threads; in a 2-CPU container on a 64-core host, 64.)"""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, available // max(1, worker_processes))


def chat_weights(weights: str | None, chat_model_path: str | None, deterministic: bool = False) -> str | None:
    """The format to make from the packaged chat model (`[embedded] weights`), checked; None: serve
    the model file as it is."""
    from overnight.engines.packaged_models import (
        NOT_DETERMINISTIC,
        PACKAGED_FTYPE,
        WEIGHT_FORMATS,
        default_weights,
    )

    if weights is None:
        return None if chat_model_path else default_weights(deterministic)
    if weights not in WEIGHT_FORMATS:
        raise ConfigurationError(f"[embedded] weights = {weights!r}: use one of {', '.join(WEIGHT_FORMATS)}")
    if chat_model_path:
        raise ConfigurationError("[embedded] weights applies to the packaged model; chat_model_path is "
                                 "served as it is (convert it with llama.cpp's llama-quantize instead)")
    if deterministic and weights in NOT_DETERMINISTIC:
        raise ConfigurationError(f"[embedded] deterministic mode cannot serve {weights}: its CPU kernels sum a "
                                 "row differently with the number of sequences decoded together. Use "
                                 f"{', '.join(w for w in WEIGHT_FORMATS if w not in NOT_DETERMINISTIC)}")
    return None if weights == PACKAGED_FTYPE else weights


def gemma_engine(settings: Settings) -> Engine | None:
    """The optional Gemma 3 270M chat engine, once its licence terms are accepted."""
    cfg = settings.embedded
    if not cfg.gemma:
        return None
    if not cfg.accept_gemma_terms:
        raise ConfigurationError(
            "Gemma 3 270M is enabled but its terms are not accepted. Serving it distributes it under the "
            "Gemma Terms of Use (https://ai.google.dev/gemma/terms), including its prohibited use policy; "
            "pass --accept-gemma-terms (or accept_gemma_terms = true under [embedded]) to go on."
        )
    from overnight.engines import packaged_models
    from overnight.engines.llama import LlamaChatEngine

    path = packaged_models.gemma_model_path(settings.resolved_models_dir)
    if path is None:
        raise ConfigurationError("Gemma is enabled but not installed: pip install 'overnight[gemma]'.")
    if cfg.deterministic:
        # Its file's matrices are mostly Q5_0 and K-quants, whose kernels sum a row differently with
        # the call's size (a third of the answers changed with batching): deterministic mode serves
        # a Q8_0 copy, made once (1.3 s), which holds those weights almost exactly.
        path = packaged_models.fast_chat_model_path(path, settings.resolved_models_dir, "Q8_0")
    log.warning(packaged_models.GEMMA_NOTICE)
    return LlamaChatEngine(path, packaged_models.GEMMA_MODEL_NAME, n_ctx=cfg.n_ctx, n_seq_max=cfg.n_seq_max,
                           threads=cfg.threads or compute_threads(settings.worker_processes),
                           deterministic=cfg.deterministic,
                           chat_template=packaged_models.GEMMA_CHAT_TEMPLATE,
                           owned_by="google; " + packaged_models.GEMMA_NOTICE)


def _check_gguf(path: str) -> None:
    """A configured chat model must be a GGUF file: otherwise every worker failed at its start,
    with a traceback, and was restarted for ever while the API accepted batches for it."""
    from overnight.engines.packaged_models import is_gguf

    try:
        with open(path, "rb"):
            pass
    except OSError as exc:  # missing, a directory, unreadable: what to fix
        raise ConfigurationError(f"[embedded] chat_model_path {path}: {exc.strerror}.") from None
    if not is_gguf(path):
        raise ConfigurationError(f"[embedded] chat_model_path {path} is not a GGUF file (llama.cpp's model "
                                 "format; convert the model with llama.cpp's convert_hf_to_gguf.py).")


def _check_row_stable(path: str) -> None:
    """Deterministic mode on a configured model: every matrix in a format whose kernels sum a row
    the same whatever else a call holds, or a refusal at start that says how to get one."""
    from overnight.engines.llama.gguf_header import NotGGUF, matrix_types
    from overnight.engines.packaged_models import ROW_STABLE_FORMATS

    try:
        others = sorted(set(matrix_types(path)) - ROW_STABLE_FORMATS)
    except NotGGUF as exc:
        raise ConfigurationError(f"[embedded] chat_model_path {exc}.") from None
    if others:
        raise ConfigurationError(
            f"[embedded] deterministic mode cannot serve {path}: some of its matrices are stored in "
            f"{', '.join(others)}, whose CPU kernels sum a row differently with the number of rows decoded "
            f"together. Serve a copy in Q8_0 (llama.cpp: llama-quantize --allow-requantize {path} "
            f"OUT.gguf Q8_0; {', '.join(sorted(ROW_STABLE_FORMATS))} keep the promise), or turn deterministic "
            "mode off.")


def _check_embedding_dir(path: str) -> None:
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json")
               if not (Path(path) / name).is_file()]
    if missing:
        raise ConfigurationError(f"[embedded] embedding_model_dir {path} lacks {', '.join(missing)} (a "
                                 "sentence-transformers BERT model directory, as all-MiniLM-L6-v2's).")


def _check_ca_file(path: str) -> None:
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"Cannot read the upstream ca_file {path}: {exc.strerror}.") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigurationError(f"The upstream ca_file {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----).")


def _stem(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".gguf")
