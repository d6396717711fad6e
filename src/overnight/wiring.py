"""The one place adapters are chosen: settings in, a wired store, file store, router, services and
worker out. The CLI calls this; so do the tests that need a whole server in-process."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from overnight import constants as C
from overnight.api.auth import MAX_KEY_CHARS, Authenticator, hash_key, owner_of
from overnight.api.auth_throttle import AuthFailureThrottle
from overnight.api.rate_limit import RateLimiter
from overnight.api.services import Services
from overnight.batches.file_service import FileService
from overnight.batches.service import BatchService
from overnight.engines.port import Engine
from overnight.engines.router import Route, Router
from overnight.engines.upstream import UpstreamEngine
from overnight.files.local import LocalFileStore
from overnight.files.port import FileStore
from overnight.files.private import make_private_dirs
from overnight.settings import HttpSettings, Settings, parse_storage_url
from overnight.store.metadata import MetadataStore
from overnight.worker.worker import Worker

log = logging.getLogger("overnight")


@dataclass(slots=True)
class Components:
    settings: Settings
    store: MetadataStore
    files: FileStore
    router: Router
    worker: Worker
    services: Services

    async def start_engines(self) -> None:
        for engine in self.router.engines():
            await engine.start()

    async def close(self) -> None:
        for engine in self.router.engines():
            await engine.close()
        self.store.close()


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
            routes.extend(Route(name, gemma, frozenset({C.CHAT_COMPLETIONS, C.COMPLETIONS}))
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
        from overnight.engines.llama_chat import LlamaChatEngine
    except ImportError as exc:  # the `embedded` extra is not installed
        log.warning("embedded engines unavailable (%s); only configured upstreams serve requests", exc)
        return engines
    cfg = settings.embedded
    chat_path = cfg.chat_model_path or packaged_models.default_chat_model_path()
    if chat_path:
        name = cfg.chat_model_name or (
            packaged_models.DEFAULT_CHAT_MODEL_NAME if not cfg.chat_model_path else _stem(chat_path)
        )
        chat = LlamaChatEngine(chat_path, name, n_ctx=cfg.n_ctx, n_seq_max=cfg.n_seq_max, threads=cfg.threads,
                               prefix_sharing=not cfg.deterministic)
        engines[C.CHAT_COMPLETIONS] = chat
        engines[C.COMPLETIONS] = chat
    embed_dir = cfg.embedding_model_dir or packaged_models.default_embedding_model_dir()
    if embed_dir:
        engines[C.EMBEDDINGS] = MiniLMEmbeddingEngine(embed_dir, threads=cfg.threads)
    return engines


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
    from overnight.engines.llama_chat import LlamaChatEngine

    path = packaged_models.gemma_model_path(settings.data_dir / "models")
    if path is None:
        raise ConfigurationError("Gemma is enabled but not installed: pip install 'overnight[gemma]'.")
    log.warning(packaged_models.GEMMA_NOTICE)
    return LlamaChatEngine(path, packaged_models.GEMMA_MODEL_NAME, n_ctx=cfg.n_ctx, n_seq_max=cfg.n_seq_max,
                           threads=cfg.threads, prefix_sharing=not cfg.deterministic, chat_template=packaged_models.GEMMA_CHAT_TEMPLATE,
                           owned_by="google; " + packaged_models.GEMMA_NOTICE)


class ConfigurationError(Exception):
    """Settings that cannot work; the CLI prints the message and exits."""


def _check_ca_file(path: str) -> None:
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"Cannot read the upstream ca_file {path}: {exc.strerror}.") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigurationError(f"The upstream ca_file {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----).")


def _stem(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".gguf")


def load_authenticator(
    settings: Settings, store: MetadataStore, announce: Callable[[str], None] | None
) -> Authenticator:
    """Configured keys, plus keys created earlier. With none at all and someone to tell (`announce`),
    create one and print it once."""
    if any(len(key) > MAX_KEY_CHARS for key in (*settings.api_keys, *settings.admin_keys)):
        raise ConfigurationError(f"A configured API key is longer than {MAX_KEY_CHARS} characters, more than the "
                                 "server accepts from a client; use a shorter one.")
    hashes = store.stored_key_hashes()
    for key in settings.api_keys:
        h = hash_key(key)
        hashes[h] = (owner_of(h), False)
    for key in settings.admin_keys:
        h = hash_key(key)
        hashes[h] = (owner_of(h), True)
    if not hashes and announce is not None:
        key = "sk-overnight-" + secrets.token_urlsafe(24)
        h = hash_key(key)
        store.add_key_hash(h, owner_of(h), False, int(time.time()))
        hashes[h] = (owner_of(h), False)
        announce(
            f"Created an API key (shown once, only its hash is stored):\n\n    {key}\n\n"
            "Pass it as api_key=... to the OpenAI SDK, or configure your own with --api-key."
        )
    return Authenticator(hashes)


def open_file_store(settings: Settings) -> FileStore:
    """The data directory, or the object store `settings.storage_url` names, checked to be usable
    (the bucket exists, the credentials work, the endpoint answers) before anything runs."""
    if not settings.storage_url:
        return LocalFileStore(settings.data_dir)
    try:
        location = parse_storage_url(settings.storage_url, settings.storage_env)
    except ValueError as exc:
        raise ConfigurationError(f"--storage-url: {exc}.") from None
    try:
        from overnight.files.s3 import S3FileStore, S3StorageError
    except ImportError:
        raise ConfigurationError("--storage-url s3://... needs boto3: pip install 'overnight[s3]'.") from None
    files = S3FileStore(
        location.bucket, location.prefix, location.endpoint_url, location.region, location.access_key,
        location.secret_key, location.session_token, part_size=location.part_size,
        conditional_writes=location.conditional_writes,
    )
    try:
        files.check()
    except S3StorageError as exc:
        raise ConfigurationError(f"{exc.strerror}.") from None
    log.info("file bytes in %s", files.describe())
    return files


def check_http_settings(http: HttpSettings) -> None:
    """Values that cannot work: timeouts that cut off every request, a header limit no client fits in,
    negative budgets."""
    if http.header_timeout_seconds <= 0 or http.body_idle_timeout_seconds <= 0:
        raise ConfigurationError("header_timeout_seconds and body_idle_timeout_seconds must be above 0.")
    if http.max_header_bytes < 4096:
        raise ConfigurationError("max_header_bytes must be at least 4096; ordinary requests need that much.")
    if http.auth_failure_burst < 0 or http.auth_failures_per_second < 0 or http.auth_failure_addresses < 1:
        raise ConfigurationError("auth_failure_burst and auth_failures_per_second cannot be negative, and "
                                 "auth_failure_addresses must be at least 1.")


def build(settings: Settings, announce: Callable[[str], None] | None = print) -> Components:
    """Wire everything. `announce` shows a newly created API key; None (worker, cleanup) creates none."""
    check_http_settings(settings.http)
    make_private_dirs(settings.data_dir)
    store = MetadataStore(settings.resolved_database_url)
    store.migrate()
    files = open_file_store(settings)
    router = build_router(settings)
    worker = Worker(store, files, router, settings.worker, settings.limits)
    services = Services(
        auth=load_authenticator(settings, store, announce),
        files=FileService(store, files),
        batches=BatchService(
            store, window_seconds=settings.limits.completion_window_seconds, on_change=worker.wake
        ),
        router=router,
        limits=settings.limits,
        rate_limiter=RateLimiter(settings.limits.requests_per_minute),
        auth_throttle=AuthFailureThrottle(
            settings.http.auth_failure_burst, settings.http.auth_failures_per_second,
            settings.http.auth_failure_addresses,
        ),
    )
    return Components(settings, store, files, router, worker, services)
