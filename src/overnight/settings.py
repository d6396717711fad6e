"""Typed configuration values. Only cli.py reads the environment; everything else receives these."""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from types import UnionType
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import unquote, urlsplit

GiB = 1024**3
_T = TypeVar("_T")
MiB = 1024**2
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    max_file_bytes: int = 2 * GiB
    max_requests_per_batch: int = 1_000_000
    # A shard ends at whichever comes first; its lines are one unit of durable work. None: the
    # serving engine's choice (1000 lines for an upstream, 64 for the embedded chat engine).
    shard_max_lines: int | None = None
    shard_max_bytes: int = 16 * MiB
    # Validation reports every bad line, but stores at most this many entries in `errors`.
    max_reported_errors: int = 1000
    # API requests per minute per key (0: unlimited). Polling once a second uses 60.
    requests_per_minute: int = 6000
    # Largest JSON request body outside of file uploads.
    max_json_body_bytes: int = 1024 * 1024
    # What the one completion window OpenAI defines ("24h") lasts on this server. Shorter values
    # are for tests and for operators who want an earlier deadline.
    completion_window_seconds: int = 24 * 3600
    # How long an upload (POST /v1/uploads) takes parts before it expires: an hour, as on OpenAI.
    # Shorter values are for tests.
    upload_expiry_seconds: int = 3600
    # Windows beyond OpenAI's one, name -> seconds (e.g. {"1h": 3600, "7d": 604800}): batches.create
    # accepts any of them. A "24h" here overrides completion_window_seconds.
    completion_windows: dict[str, int] = field(default_factory=dict)
    # Validate a purpose=batch upload as it arrives, so that batches.create on it starts at once
    # (in_progress, no validating phase). Off: every batch is validated by a worker after create.
    validate_on_upload: bool = True

    def windows(self) -> dict[str, int]:
        """Every completion window this server accepts, name -> seconds."""
        return {"24h": self.completion_window_seconds, **self.completion_windows}


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """What one client may cost the server before it is cut off: slow or oversized requests hold a
    connection (and, for uploads, a temp file) only this long, and wrong keys are throttled."""

    # From a connection's first byte (or its opening) to the end of a request's headers.
    header_timeout_seconds: float = 10.0
    # The longest pause between two pieces of a request body; an upload that stalls longer is
    # dropped (its temp file removed) and answered 408.
    body_idle_timeout_seconds: float = 30.0
    # Request line plus headers; larger requests get 431 before the app sees them.
    max_header_bytes: int = 64 * 1024
    # Failed authentications per client address (IPv6: per /64): a burst of this many, then
    # `auth_failures_per_second`; over it, 429 before the key is checked. 0 turns it off.
    auth_failure_burst: int = 20
    auth_failures_per_second: float = 1.0
    # How many addresses the throttle remembers at most (the one whose last failure is oldest goes first).
    auth_failure_addresses: int = 10_000


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    # A killed worker's shards are taken over this long after its last heartbeat (one a second).
    lease_seconds: float = 15.0
    poll_seconds: float = 0.5
    max_shards_in_flight: int = 8
    # Validations and finalizations run at once (each in a thread; they are mostly I/O).
    max_batch_tasks: int = 4
    # A shard claimed this many times without committing (its workers keep dying on it) is given
    # up: its lines are reported as `shard_failed` instead of being run again.
    max_shard_attempts: int = 10
    # Batches due within this long are served before batches with slack (see store/queue.py).
    deadline_horizon_seconds: float = 3 * 3600
    # Added to a worker process's niceness (0-19; more yields the CPU more). None: 10 for a worker
    # without the embedded engine, which only feeds HTTP upstreams, so that a model server on the
    # same machine (and the API) never waits for the CPU behind it (bench_orchestration's upstream
    # on the same 2 cores did more with it); 0 for one with the embedded engine, which is the work.
    # A worker inside the API process (`--workers 0`) keeps the API's.
    nice: int | None = None


@dataclass(frozen=True, slots=True)
class RetrySettings:
    max_attempts: int = 8
    base_delay: float = 0.5
    max_delay: float = 30.0


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """An OpenAI-compatible server that lines whose model matches `models` are sent to."""

    base_url: str
    models: tuple[str, ...] = ("*",)
    name: str = ""
    api_key: str | None = None
    # PEM file of extra root certificates to trust for this upstream (a private CA); the system's
    # trusted roots are trusted either way.
    ca_file: str | None = None
    max_concurrency: int = 64
    min_concurrency: int = 1
    initial_concurrency: int = 16
    timeout_seconds: float = 600.0
    retry: RetrySettings = field(default_factory=RetrySettings)

    @property
    def label(self) -> str:
        return self.name or self.base_url


@dataclass(frozen=True, slots=True)
class EmbeddedSettings:
    enabled: bool = True
    chat_model_path: str | None = None  # a GGUF; None means the packaged SmolLM2
    chat_model_name: str | None = None
    embedding_model_dir: str | None = None
    # Total KV cache; each of the n_seq_max slots may hold n_ctx // n_seq_max tokens (prompt +
    # completion), 2048 here (~3 GB of KV for SmolLM2, ~23 KB per cell). 64 slots: a generation step
    # reads the weights once for every sequence in it, and on 2 cores a 256-line batch ran 12-24%
    # faster on 64 slots than on 32 (bench_embedded.py --levers compares 16, 32 and 64 slots); a step
    # then takes ~160 ms, which is what an online request's next token waits under batch load.
    n_ctx: int = 131072
    n_seq_max: int = 64
    threads: int | None = None
    # Greedy output that depends only on the line (never on what else is in flight): the KV cache in
    # q8_0, where every row is computed alone (engines/llama/scheduler.py, Determinism), and Q8_0
    # weights where the default would be BF16. Slower; bench_embedded measures by how much.
    deterministic: bool = False
    # The format the packaged SmolLM2 is served in, made once from its Q4_1 file (packaged_models.py):
    # "BF16" and "Q8_0" keep the model (KL divergence from Q4_1: bench_embedded.py --quality) on fast
    # CPU kernels, BF16 the faster for batches where the CPU has AVX512_BF16; "IQ4_NL" and "Q4_0" re-round
    # every weight to 4 bits (a different model); "Q4_1" is the file as packaged. Deterministic mode
    # serves Q8_0, Q4_0 and Q4_1 (packaged_models.ROW_STABLE_FORMATS; its promise is tested on each).
    # None: BF16 with AVX512_BF16, Q8_0 otherwise and in deterministic mode (default_weights).
    weights: str | None = None
    # Gemma 3 270M as a second chat model, routed by its name "gemma-3-270m" (never the default).
    # Serving it counts as distributing it: it is only loaded once the operator accepts the
    # Gemma Terms of Use (ai.google.dev/gemma/terms) with accept_gemma_terms.
    gemma: bool = False
    accept_gemma_terms: bool = False


BATCH_WEBHOOK_EVENTS = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """One endpoint that receives the batch events of one API key's owner (`[[webhooks]]`).
    The owner is named by its key (`api_key`, hashed at wiring, never stored) or by the owner
    id itself (`owner = "key_..."`, for configs that should not hold the key)."""

    url: str
    secret: str = field(repr=False)  # `whsec_<base64>`, as OpenAI issues them
    api_key: str | None = field(default=None, repr=False)
    owner: str | None = None
    events: tuple[str, ...] = BATCH_WEBHOOK_EVENTS


@dataclass(frozen=True, slots=True)
class WebhookDeliverySettings:
    """How webhook events are delivered (`[webhook_delivery]`): at least once, retried after each
    delay in turn (each +/- `jitter`), then given up."""

    # 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 2 h, 4 h, 8 h, 16 h, 24 h: about 56 h in all.
    retry_delays: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 57600, 86400)
    jitter: float = 0.2
    timeout_seconds: float = 10.0
    # How often a worker looks for deliveries that are due (it also looks after each batch ends).
    poll_seconds: float = 1.0
    max_in_flight: int = 8


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path = Path("./data")
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str | None = None  # default: sqlite file in data_dir
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()
    upstreams: tuple[UpstreamSettings, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    # Lines whose model matches no route run on the embedded default model (issue: zero-config).
    fallback_to_default: bool = True
    limits: Limits = field(default_factory=Limits)
    http: HttpSettings = field(default_factory=HttpSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    embedded: EmbeddedSettings = field(default_factory=EmbeddedSettings)
    run_worker: bool = True
    # `overnight serve` runs the worker in this many child processes (0: inside the API process).
    worker_processes: int = 1
    # Where file bytes live: None, the data directory's blobs/; `s3://BUCKET/PREFIX?endpoint=...`,
    # an S3-compatible object store (see `parse_storage_url`). The metadata stays in database_url.
    storage_url: str | None = field(default=None, repr=False)  # may hold a secret key
    # The standard AWS variables (STORAGE_ENV_VARS) as cli.py found them: what the URL leaves out.
    storage_env: dict[str, str] = field(default_factory=dict, repr=False)
    webhooks: tuple[WebhookSettings, ...] = ()
    webhook_delivery: WebhookDeliverySettings = field(default_factory=WebhookDeliverySettings)
    # Where every process of `overnight serve` writes its Prometheus values (set up by the CLI);
    # None: metrics count in memory only and GET /metrics serves the store's gauges alone.
    metrics_dir: Path | None = None
    log_format: str = "text"  # or "json": one object per line (observability/logs.py)
    # Where model files made from the packaged ones live (requantized weights, assembled Gemma);
    # None: the data directory's models/. `overnight run` in a scratch directory keeps them in the
    # user's cache instead, so each run does not make them again.
    models_dir: Path | None = None

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'overnight.db').resolve()}"

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir or self.data_dir / "models"


STORAGE_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                    "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


@dataclass(frozen=True, slots=True)
class S3Location:
    """Where and how to reach an S3 bucket; `repr` leaves the credentials out."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None  # None: AWS itself
    region: str = "us-east-1"
    access_key: str | None = field(default=None, repr=False)  # None: boto3's own chain (profile, role)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    part_size: int = 8 * MiB
    conditional_writes: bool = True


_S3_QUERY_KEYS = ("endpoint", "region", "access_key", "secret_key", "session_token", "part_size_mib", "conditional")


def parse_storage_url(url: str, env: Mapping[str, str]) -> S3Location:
    """`s3://BUCKET/PREFIX?endpoint=URL&region=R&access_key=K&secret_key=S` (everything after the
    bucket optional; percent-encode a secret's reserved characters, '+' stays '+'). What the query
    leaves out comes from the AWS variables in `env`; no endpoint means AWS. Also `part_size_mib`
    (multipart part size, at least 5) and `conditional=false` (for servers that refuse
    If-None-Match). ValueError says what is wrong, never with a secret in it."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise ValueError(f"unsupported storage URL scheme {parts.scheme + '://' if parts.scheme else url!r}: "
                         "use s3://BUCKET/PREFIX?endpoint=..., or leave it out to keep files in the data directory")
    if not parts.netloc or "@" in parts.netloc:
        raise ValueError("the storage URL needs a bucket: s3://BUCKET/PREFIX (credentials go in the query, "
                         "access_key=...&secret_key=..., or in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    query: dict[str, str] = {}
    for item in filter(None, parts.query.split("&")):
        name, _, value = item.partition("=")
        if name not in _S3_QUERY_KEYS:
            raise ValueError(f"unknown storage URL parameter {name!r} (known: {', '.join(_S3_QUERY_KEYS)})")
        query[name] = unquote(value)
    endpoint = query.get("endpoint") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"the S3 endpoint {endpoint!r} must start with http:// or https://")
    if ("access_key" in query) != ("secret_key" in query):
        raise ValueError("give both access_key and secret_key in the storage URL, or neither")
    access_key: str | None
    secret_key: str | None
    if "access_key" in query:
        access_key, secret_key, token = query["access_key"], query["secret_key"], query.get("session_token")
    else:
        access_key = env.get("AWS_ACCESS_KEY_ID") or None
        secret_key = env.get("AWS_SECRET_ACCESS_KEY") or None
        token = query.get("session_token") or env.get("AWS_SESSION_TOKEN") or None
    try:
        part_size = int(float(query.get("part_size_mib", "8")) * MiB)
    except ValueError:
        raise ValueError("part_size_mib must be a number (MiB)") from None
    if part_size < 5 * MiB:
        raise ValueError("part_size_mib must be at least 5 (the S3 minimum part size)")
    conditional = query.get("conditional", "true").lower()
    if conditional not in ("true", "false", "1", "0"):
        raise ValueError("conditional must be true or false")
    return S3Location(
        bucket=parts.netloc,
        prefix=parts.path.strip("/"),
        endpoint_url=endpoint.rstrip("/") if endpoint else None,
        region=query.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        access_key=access_key,
        secret_key=secret_key,
        session_token=token,
        part_size=part_size,
        conditional_writes=conditional in ("true", "1"),
    )


def parse_completion_windows(flags: list[str]) -> dict[str, int]:
    """`NAME=SECONDS` flags as windows; ValueError says which one is malformed."""
    windows: dict[str, int] = {}
    for flag in flags:
        name, sep, seconds = flag.partition("=")
        if not sep or not name.strip() or not seconds.strip().isdigit() or int(seconds) <= 0:
            raise ValueError(f"--completion-window {flag!r}: expected NAME=SECONDS, e.g. 1h=3600")
        windows[name.strip()] = int(seconds)
    return windows


def parse_upstream_flag(value: str) -> UpstreamSettings:
    """`PATTERN=BASE_URL` (or just `BASE_URL`, meaning every model)."""
    pattern, sep, url = value.partition("=")
    if not sep or pattern.startswith(("http://", "https://")):
        return UpstreamSettings(base_url=value.strip())
    return UpstreamSettings(base_url=url.strip(), models=(pattern.strip(),))


def load_config_file(path: Path, base: Settings) -> Settings:
    """Merge a TOML config file into `base`. See README 'Configuration' for the format. Every key is
    checked against the setting it names, so a typo or a value of the wrong type is a ValueError
    naming it, never a traceback (or worse, a string taken as a list of one-character API keys)."""
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ValueError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - set(_TOP_LEVEL))
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(_TOP_LEVEL)})")
    upstreams = list(base.upstreams)
    for i, item in enumerate(_list(raw.get("upstreams", []), "upstreams")):
        item = dict(_table(item, f"upstreams[{i}]"))
        if isinstance(item.get("models"), str):
            item["models"] = [item["models"]]
        item.setdefault("models", ["*"])
        upstreams.append(_build(UpstreamSettings, item, f"upstreams[{i}]"))
    changes: dict[str, object] = {"upstreams": tuple(upstreams)}
    if "aliases" in raw:
        changes["aliases"] = {**base.aliases, **_value(dict[str, str], raw["aliases"], "aliases")}
    for section in ("limits", "http", "worker", "embedded", "webhook_delivery"):
        if section in raw:
            current = getattr(base, section)
            changes[section] = replace(current, **_fields(type(current), raw[section], section))
    if "fallback_to_default" in raw:
        changes["fallback_to_default"] = _value(bool, raw["fallback_to_default"], "fallback_to_default")
    for keys in ("api_keys", "admin_keys"):
        if keys in raw:
            given = _value(tuple[str, ...], raw[keys], keys)
            if not all(given):
                raise ValueError(f"{keys}: an API key cannot be empty")
            changes[keys] = getattr(base, keys) + given
    if "storage_url" in raw:
        changes["storage_url"] = _value(str, raw["storage_url"], "storage_url")
    if "webhooks" in raw:
        changes["webhooks"] = base.webhooks + tuple(
            _webhook(dict(_table(item, f"webhooks[{i}]")), f"webhooks[{i}]")
            for i, item in enumerate(_list(raw["webhooks"], "webhooks")))
    return replace(base, **changes)  # type: ignore[arg-type]


# Settings that do nothing useful (or hang: no shard is ever claimed at 0) below a minimum:
# (section, name, least value). Checked after the config file and the flags are applied.
_AT_LEAST: tuple[tuple[str, str, float], ...] = (
    ("limits", "max_file_bytes", 1), ("limits", "max_requests_per_batch", 1), ("limits", "shard_max_lines", 1),
    ("limits", "shard_max_bytes", 1024), ("limits", "max_reported_errors", 0), ("limits", "requests_per_minute", 0),
    ("limits", "completion_window_seconds", 1), ("limits", "upload_expiry_seconds", 1),
    ("worker", "lease_seconds", 0.1), ("worker", "poll_seconds", 0.001), ("worker", "max_shards_in_flight", 1),
    ("worker", "max_batch_tasks", 1), ("worker", "max_shard_attempts", 1), ("worker", "deadline_horizon_seconds", 0),
    ("embedded", "n_ctx", 1), ("embedded", "n_seq_max", 1), ("embedded", "threads", 1),
    ("webhook_delivery", "max_in_flight", 1), ("webhook_delivery", "poll_seconds", 0.001),
)


def check_ranges(settings: Settings) -> None:
    """A ValueError naming the first setting below its least useful value."""
    for section, name, least in _AT_LEAST:
        value = getattr(getattr(settings, section), name)
        if value is not None and value < least:
            raise ValueError(f"{section}.{name} must be at least {least:g}, not {value}")
    embedded = settings.embedded
    if embedded.enabled and embedded.n_seq_max > 256:
        raise ValueError(f"embedded.n_seq_max must be at most 256 (llama.cpp's limit), not {embedded.n_seq_max}")
    if embedded.enabled and embedded.n_ctx // embedded.n_seq_max < 256:
        # Each slot gets n_ctx // n_seq_max tokens: below this every chat line was refused as too long.
        raise ValueError(f"embedded.n_ctx = {embedded.n_ctx} gives each of the {embedded.n_seq_max} slots "
                         f"(n_seq_max) {embedded.n_ctx // embedded.n_seq_max} tokens of context, under 256: "
                         "raise n_ctx or lower n_seq_max")
    for i, upstream in enumerate(settings.upstreams):
        if not 1 <= upstream.min_concurrency <= upstream.max_concurrency:
            raise ValueError(f"upstreams[{i}]: concurrency must satisfy 1 <= min_concurrency <= max_concurrency "
                             f"(given {upstream.min_concurrency} and {upstream.max_concurrency})")


_TOP_LEVEL = ("upstreams", "aliases", "limits", "http", "worker", "embedded", "fallback_to_default", "api_keys",
              "admin_keys", "storage_url", "webhooks", "webhook_delivery")


def _webhook(item: dict[str, object], where: str) -> WebhookSettings:
    if isinstance(item.get("events"), str):
        item["events"] = [item["events"]]
    item.setdefault("events", list(BATCH_WEBHOOK_EVENTS))
    return _build(WebhookSettings, item, where)


def _build(cls: type[_T], table: object, where: str) -> _T:
    """A `cls` from a TOML table, every key checked; a required key missing is named."""
    kwargs = _fields(cls, table, where)
    missing = [f.name for f in fields(cls)  # type: ignore[arg-type]
               if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{where}: {missing[0]!r} is required")
    return cls(**kwargs)


# Keys that meant something in an earlier version and no longer do: a config that sets one still
# loads (with a warning), where an unknown key is refused.
_RETIRED = {
    ("embedded", "online_slot"): "deterministic mode preempts batch lines for online requests, as the fast mode does",
}


def _fields(cls: type, table: object, where: str) -> dict[str, object]:
    """A TOML table as keyword arguments of dataclass `cls`: known names, values of their types."""
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    out: dict[str, object] = {}
    for key, value in _table(table, where).items():
        if (where, key) in _RETIRED:
            log.warning("[%s] %s is no longer used (%s): remove it from the config", where, key, _RETIRED[where, key])
            continue
        if key not in names:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(names)})")
        out[key] = _value(hints[key], value, f"{where}.{key}")
    return out


def _value(hint: object, value: object, where: str) -> Any:
    """`value` as the type `hint` names (TOML gives int, float, bool, str, lists and tables)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):  # X | None: TOML has no null, so the value is an X
        return _value(next(a for a in args if a is not type(None)), value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false, not {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be a whole number, not {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{where} must be a number, not {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where} must be a string, not {value!r}")
    if origin is tuple:
        return tuple(_value(args[0], item, f"{where}[{i}]") for i, item in enumerate(_list(value, where)))
    if origin is dict:
        return {key: _value(args[1], item, f"{where}.{key}") for key, item in _table(value, where).items()}
    if isinstance(hint, type) and is_dataclass(hint):
        return _build(hint, value, where)
    raise TypeError(f"no TOML reading for {hint!r} ({where})")  # a setting added without one: a bug here


def _table(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a table ({where} = {{...}} or [{where}]), not {value!r}")
    return value


def _list(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list ([...]), not {value!r}")
    return value
