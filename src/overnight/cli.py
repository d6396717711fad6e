"""`overnight serve | run | worker | cleanup | batch`: the only place that reads the environment.

`overnight batch ...` is the API client (overnight.client.cli); it is dispatched before anything of
the server is imported, so it runs where only the client's dependencies are installed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from overnight import __version__
from overnight.engines.packaged_models import WEIGHT_FORMATS
from overnight.settings import (
    STORAGE_ENV_VARS,
    EmbeddedSettings,
    Limits,
    Settings,
    check_ranges,
    load_config_file,
    parse_completion_windows,
    parse_upstream_flag,
)

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("overnight")
# `cleanup` with an orphan age looks twice this far apart: an object its writer is about to name
# (a commit follows the write within moments) is named by the second look.
CLEANUP_RECHECK_SECONDS = 10.0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None, help="where files and the SQLite database live")
    parser.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: SQLite in --data-dir)")
    parser.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="PATTERN=BASE_URL",
        help="route models matching PATTERN (exact name or glob like 'gpt-*') to an OpenAI-compatible "
        "server, e.g. '*=http://127.0.0.1:8001/v1'. Repeatable; first match wins after exact names.",
    )
    parser.add_argument(
        "--storage-url", default=None, metavar="s3://BUCKET/PREFIX?endpoint=URL&region=REGION",
        help="keep file bytes in an S3-compatible object store instead of --data-dir (metadata stays in "
        "--database-url); credentials from the URL's access_key/secret_key or AWS_ACCESS_KEY_ID/"
        "AWS_SECRET_ACCESS_KEY, endpoint and region also from AWS_ENDPOINT_URL/AWS_REGION",
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML config file (see README)")
    parser.add_argument("--log-format", choices=("text", "json"), default=None,
                        help="text (default), or json: one object per line with time, level, logger, message "
                        "and request_id/batch_id/shard where they apply")
    parser.add_argument("--no-embedded", action="store_true", help="do not load the embedded engines")
    parser.add_argument(
        "--no-fallback",
        action="store_true",
        help="lines whose model matches no route fail validation (model_not_found) instead of "
        "running on the embedded default model",
    )
    parser.add_argument("--gemma", action="store_true",
                        help="also serve Gemma 3 270M as 'gemma-3-270m' (needs the gemma extra and --accept-gemma-terms)")
    parser.add_argument("--accept-gemma-terms", action="store_true",
                        help="accept the Gemma Terms of Use (ai.google.dev/gemma/terms) for serving Gemma")
    parser.add_argument("--deterministic", action="store_true",
                        help="embedded chat: a temperature-0 line's answer depends only on the line (Q8_0 "
                        "weights, keys and values cached in q8_0: slower, see bench_embedded)")
    parser.add_argument("--weights", choices=WEIGHT_FORMATS, default=None,
                        help="embedded chat: the format the packaged model is served in (default: BF16 on CPUs "
                        "with AVX512_BF16, else Q8_0; both keep the model; IQ4_NL, Q4_0: re-round every weight "
                        "to 4 bits; Q4_1: as packaged)")
    parser.add_argument("--lease-seconds", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shard-lines", type=int, default=None, help="requests per shard (default 256)")
    parser.add_argument("--max-shards", type=int, default=None, help="shards run at once per worker")
    parser.add_argument(
        "--completion-window-seconds",
        type=int,
        default=None,
        help="how long the '24h' completion window lasts on this server (default 86400)",
    )
    parser.add_argument("--upload-expiry-seconds", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-validate-on-upload", action="store_true",
                        help="validate batch inputs when a batch is created, not as they are uploaded")
    parser.add_argument(
        "--completion-window", action="append", default=[], metavar="NAME=SECONDS",
        help="accept another completion window, e.g. 1h=3600 or 7d=604800 (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overnight", description="A self-hosted, OpenAI-compatible Batch API.")
    parser.add_argument("--version", action="version", version=f"overnight {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the API and run the worker in the same process")
    _common(serve)
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--api-key", action="append", default=[], help="an accepted API key (repeatable)")
    serve.add_argument("--admin-key", action="append", default=[],
                       help="a key that reads every owner's objects and may cancel any batch "
                       "(it deletes only its own files)")
    serve.add_argument("--no-worker", action="store_true", help="serve the API only (run `overnight worker` apart)")
    serve.add_argument("--workers", type=_count, default=None,
                       help="worker processes beside the API (default 1; 0 runs the worker in the API process)")
    serve.add_argument("--header-timeout", type=float, default=None, metavar="SECONDS",
                       help="close connections whose request headers take longer than this (default 10)")
    serve.add_argument("--body-idle-timeout", type=float, default=None, metavar="SECONDS",
                       help="answer 408 to a request whose body pauses longer than this (default 30)")
    serve.add_argument("--auth-failure-burst", type=int, default=None, metavar="N",
                       help="failed authentications per client address before 429 (default 20; 0: no limit)")
    serve.add_argument("--auth-failures-per-second", type=float, default=None, metavar="RATE",
                       help="how fast an address's failed-authentication budget refills (default 1)")

    run = sub.add_parser("run", help="run one batch file through the same machinery, without a server")
    _common(run)
    run.add_argument("-i", "--input", type=Path, required=True, help="input JSONL (OpenAI batch format)")
    run.add_argument("-o", "--output", type=Path, required=True, help="where successful lines go")
    run.add_argument("--errors", type=Path, default=None, help="where failed lines go (default: --output)")
    run.add_argument("--endpoint", default=None, help="default: the url of the first line")

    worker = sub.add_parser("worker", help="run a worker only, against a shared database and data dir")
    _common(worker)
    worker.add_argument("--metrics-port", type=int, default=None,
                        help="serve this worker's Prometheus metrics at http://HOST:PORT/metrics")
    worker.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (default 127.0.0.1)")

    cleanup = sub.add_parser("cleanup", help="remove deleted/expired files and orphaned objects once, and exit")
    _common(cleanup)
    cleanup.add_argument("--orphan-age-seconds", type=float, default=3600.0,
                         help="objects no row names are removed once this old (0 only while no server runs)")

    # Listed for --help only: main() hands `batch ...` to the client before this parser runs.
    sub.add_parser("batch", add_help=False,
                   help="build, submit, wait for, cancel and download batches on any OpenAI-compatible "
                   "Batch API (see `overnight batch --help`)")
    return parser


def settings_from(args: argparse.Namespace, env: dict[str, str]) -> Settings:
    data_dir = args.data_dir or Path(env.get("OVERNIGHT_DATA_DIR", "./data"))
    settings = Settings(data_dir=data_dir)
    if args.config is not None:
        settings = load_config_file(args.config, settings)
    keys = [k.strip() for k in env.get("OVERNIGHT_API_KEYS", "").split(",") if k.strip()]
    keys += getattr(args, "api_key", [])
    admin = [k.strip() for k in env.get("OVERNIGHT_ADMIN_KEYS", "").split(",") if k.strip()]
    admin += getattr(args, "admin_key", [])
    upstreams = tuple(parse_upstream_flag(v) for v in args.upstream)
    worker = settings.worker
    if args.lease_seconds is not None:
        worker = replace(worker, lease_seconds=args.lease_seconds, poll_seconds=min(worker.poll_seconds, 0.2))
    if args.max_shards is not None:
        worker = replace(worker, max_shards_in_flight=args.max_shards)
    limits = settings.limits
    if args.shard_lines is not None:
        limits = replace(limits, shard_max_lines=args.shard_lines)
    if args.completion_window_seconds is not None:
        limits = replace(limits, completion_window_seconds=args.completion_window_seconds)
    if args.upload_expiry_seconds is not None:
        limits = replace(limits, upload_expiry_seconds=args.upload_expiry_seconds)
    if args.no_validate_on_upload:
        limits = replace(limits, validate_on_upload=False)
    if args.completion_window:
        try:
            extra = parse_completion_windows(args.completion_window)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        limits = replace(limits, completion_windows={**limits.completion_windows, **extra})
    http = settings.http
    http_flags = {"header_timeout": "header_timeout_seconds", "body_idle_timeout": "body_idle_timeout_seconds",
                  "auth_failure_burst": "auth_failure_burst", "auth_failures_per_second": "auth_failures_per_second"}
    for flag, name in http_flags.items():  # serve's flags only
        if getattr(args, flag, None) is not None:
            http = replace(http, **{name: getattr(args, flag)})
    embedded = settings.embedded
    if args.gemma or args.accept_gemma_terms:
        embedded = replace(embedded, gemma=embedded.gemma or args.gemma,
                           accept_gemma_terms=embedded.accept_gemma_terms or args.accept_gemma_terms)
    if args.deterministic:
        embedded = replace(embedded, deterministic=True)
    if getattr(args, "weights", None):
        embedded = replace(embedded, weights=args.weights)
    if args.no_embedded:
        embedded = EmbeddedSettings(enabled=False)
    settings = replace(
        settings,
        database_url=args.database_url or env.get("OVERNIGHT_DATABASE_URL") or settings.database_url,
        host=getattr(args, "host", None) or env.get("OVERNIGHT_HOST", settings.host),
        port=getattr(args, "port", None) or int(env.get("OVERNIGHT_PORT", settings.port)),
        api_keys=settings.api_keys + tuple(keys),
        admin_keys=settings.admin_keys + tuple(admin),
        upstreams=upstreams + settings.upstreams,
        fallback_to_default=settings.fallback_to_default and not args.no_fallback,
        embedded=embedded,
        worker=worker,
        limits=limits,
        http=http,
        run_worker=not getattr(args, "no_worker", False),
        worker_processes=_int_or(getattr(args, "workers", None), settings.worker_processes),
        storage_url=args.storage_url or env.get("OVERNIGHT_STORAGE_URL") or settings.storage_url,
        storage_env={name: env[name] for name in STORAGE_ENV_VARS if env.get(name)},
        log_format=args.log_format or env.get("OVERNIGHT_LOG_FORMAT") or settings.log_format,
    )
    check_ranges(settings)
    return settings


def _count(text: str) -> int:
    """A whole number of at least 0 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, not {value}")
    return value


def _int_or(value: int | None, default: int) -> int:
    return value if value is not None else default


def entry() -> None:
    """The `overnight` command: `main`, then exit without interpreter finalization (see
    `runtime.exit_now`). Tests call `main` directly."""
    from overnight.runtime import exit_now

    try:
        main()
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        exit_now(exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1)
    except KeyboardInterrupt:
        exit_now(130)
    except BaseException:
        traceback.print_exc()
        exit_now(1)
    exit_now(0)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["batch"]:
        sys.exit(_batch(argv[1:]))
    args = _parser().parse_args(argv)
    try:
        settings = settings_from(args, dict(os.environ))
    except ValueError as exc:  # a config file or a value that cannot work, named in the message
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    from overnight.observability.logs import configure_logging

    configure_logging(settings.log_format, process="worker" if args.command == "worker" else "api")
    if args.command != "run":
        # Belt and braces beside the explicit modes: whatever else this process creates (the
        # Gemma model, files a library writes) is private too. `run` keeps the umask for its outputs.
        os.umask(0o077)
    problem = None if _scratch_run(args) else _data_dir_problem(settings.data_dir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    if not _scratch_run(args):
        from overnight.files.private import tighten_data_dir

        tighten_data_dir(settings.data_dir)  # an older version left it 0755, its files 0644
    if args.command == "serve" or (args.command == "worker" and args.metrics_port is not None):
        settings = _with_metrics_dir(settings)  # before the imports below load prometheus_client
    from overnight.wiring import ConfigurationError

    try:
        _dispatch(args, settings)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _batch(argv: list[str]) -> int:
    """`overnight batch ...`: the API client. The SDK reads OPENAI_BASE_URL and OPENAI_API_KEY."""
    try:
        from overnight.client.cli import main as batch_main
    except ModuleNotFoundError as exc:
        if exc.name != "openai":
            raise
        print("error: `overnight batch` needs the openai package: pip install 'overnight[client]'", file=sys.stderr)
        return 2
    return batch_main(argv)


def _dispatch(args: argparse.Namespace, settings: Settings) -> None:
    if args.command == "serve":
        serve(settings)
    elif args.command == "worker":
        from overnight.runtime import run_on_fastest_loop
        from overnight.worker.processes import run_worker, yield_cpu

        metrics = (args.metrics_host, args.metrics_port) if args.metrics_port is not None else None
        yield_cpu(settings)
        run_on_fastest_loop(run_worker(settings, metrics_address=metrics))
    elif args.command == "cleanup":
        from overnight.batches.housekeeping import OrphanSightings, collect_garbage
        from overnight.wiring import build_core

        core = build_core(settings)  # no engines, no worker, no authenticator: only what cleanup reads
        try:
            age = args.orphan_age_seconds
            # With an orphan age, a server may be writing: an orphan is one two passes find unnamed.
            sightings = OrphanSightings() if age > 0 else None
            removed = collect_garbage(core.store.housekeeping, core.files, time.time(), age, sightings)
            if sightings is not None and sightings.keys:
                time.sleep(CLEANUP_RECHECK_SECONDS)
                removed += collect_garbage(core.store.housekeeping, core.files, time.time(), age, sightings)
        finally:
            core.close()
        print(f"removed {removed} objects", file=sys.stderr)
    else:
        from overnight.one_shot import NO_DEADLINE_SECONDS, run_file

        if settings.limits.completion_window_seconds == Limits().completion_window_seconds:
            # Not configured: a one-shot run has no deadline (the 24 hours are a server's promise).
            settings = replace(settings, limits=replace(settings.limits, completion_window_seconds=NO_DEADLINE_SECONDS))
        try:
            code = asyncio.run(run_file(settings, args.input, args.output, args.errors, args.endpoint,
                                        _scratch_run(args)))
        except asyncio.CancelledError:  # SIGTERM or SIGHUP
            print("error: stopped before the batch finished; no results were written", file=sys.stderr)
            code = 143
        sys.exit(code)


def _scratch_run(args: argparse.Namespace) -> bool:
    """Without a data dir chosen, `run` keeps nothing: it works in a scratch directory."""
    return args.command == "run" and args.data_dir is None and "OVERNIGHT_DATA_DIR" not in os.environ


def _data_dir_problem(data_dir: Path) -> str | None:
    """Say plainly why the data directory cannot be used, before anything is written to it."""
    from overnight.files.private import create_private, make_private_dirs

    try:
        make_private_dirs(data_dir)
        probe = data_dir / ".write-test"
        os.close(create_private(probe, exclusive=False))
        probe.unlink()
    except OSError as exc:
        return f"the data directory {data_dir} is not writable ({exc.strerror}); choose another with --data-dir"
    return None


def serve(settings: Settings) -> None:
    """The API, plus the worker: in `settings.worker_processes` child processes (default 1), or
    in the API's own event loop when that is 0."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from overnight.api.app import create_app
    from overnight.api.http_protocol import guarded_protocol
    from overnight.online import OnlineService, RelayClient
    from overnight.wiring import build
    from overnight.worker.processes import WorkerProcesses

    parts = build(settings, announce=lambda text: print(text, file=sys.stderr, flush=True))
    idle = settings.http.body_idle_timeout_seconds
    # Online requests run where the batch lines run, so that they can go ahead of them: on this
    # process's engines, or on the worker processes' (through their sockets). With no worker here
    # (--no-worker), this process's engines answer them, started on first use.
    parts.services.online = OnlineService(parts.router)
    on_signal: Callable[[], None] | None = None
    if not settings.run_worker:
        app = create_app(parts.services, on_shutdown=parts.close, body_idle_timeout=idle)
    elif settings.worker_processes == 0:
        app = create_app(parts.services, on_startup=parts.start_engines, background=parts.worker.run,
                         on_shutdown=parts.close, body_idle_timeout=idle)
    else:
        workers = WorkerProcesses(settings, settings.worker_processes)
        on_signal = workers.server_stopping
        parts.services.online = RelayClient(workers.relay_paths)
        parts.services.batches.on_change = workers.notify
        parts.services.workers_ready = workers.ready

        async def start_workers() -> None:
            workers.start()

        async def stop_workers() -> None:
            await asyncio.to_thread(workers.stop)
            await parts.close()

        app = create_app(parts.services, on_startup=start_workers, background=workers.supervise,
                         on_shutdown=stop_workers, body_idle_timeout=idle)
    log.info("serving on http://%s:%s/v1 (data in %s)", settings.host, settings.port, settings.data_dir)
    # The protocol bounds the time and size of request headers, which uvicorn does not.
    # In JSON mode uvicorn's own lines go through our handler too (log_config=None keeps it from
    # installing its text formatter).
    log_config = None if settings.log_format == "json" else LOGGING_CONFIG
    # X-Forwarded-For is believed only from proxies the operator names (uvicorn's FORWARDED_ALLOW_IPS):
    # uvicorn's default believed any local process, so behind an nginx that passes the header on, a
    # client chose its own address and escaped the failed-authentication throttle.
    trusted = os.environ.get("FORWARDED_ALLOW_IPS")
    _run_uvicorn(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                                http=guarded_protocol(settings.http), log_config=log_config,
                                proxy_headers=trusted is not None, forwarded_allow_ips=trusted), on_signal)


def _run_uvicorn(config: uvicorn.Config, on_signal: Callable[[], None] | None) -> None:
    """`uvicorn.run`, also calling `on_signal` when SIGINT or SIGTERM reaches the server: at once,
    while uvicorn still lets the requests in flight finish (which can take longer than a worker
    process that exited with the same signal waits to be replaced: it must not be)."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if on_signal is not None:
                on_signal()
            super().handle_exit(sig, frame)

    server = Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def _with_metrics_dir(settings: Settings) -> Settings:
    """Put prometheus-client in multiprocess mode under the data dir, emptied, before this process
    or a worker process (they inherit the environment) first imports it: then a scrape of the API
    counts the API and every worker. Must run before anything imports prometheus_client."""
    from overnight.observability.paths import MULTIPROC_ENV, prepare_metrics_dir

    metrics_dir = prepare_metrics_dir(settings.data_dir)
    os.environ[MULTIPROC_ENV] = str(metrics_dir)
    return replace(settings, metrics_dir=metrics_dir)


if __name__ == "__main__":  # pragma: no cover
    main()
