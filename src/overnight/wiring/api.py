"""The API's parts: the authenticator, rate limits and the services its routes call."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from overnight.api.auth import MAX_KEY_CHARS, Authenticator, hash_key, owner_of
from overnight.api.auth_throttle import AuthFailureThrottle
from overnight.api.rate_limit import RateLimiter
from overnight.api.services import Services
from overnight.batches.file_service import FileService
from overnight.batches.live_results import LiveResults
from overnight.batches.retry import BatchRetries
from overnight.batches.service import BatchService
from overnight.batches.upload_check import UploadChecks
from overnight.batches.upload_service import UploadService
from overnight.engines.router import Router
from overnight.settings import HttpSettings, Settings
from overnight.store.keys import SqlKeyStore
from overnight.wiring.core import ConfigurationError, Core


def build_api(
    core: Core, router: Router, announce: Callable[[str], None] | None, on_change: Callable[[str], None] = lambda change: None
) -> Services:
    """`router` lists the models (GET /v1/models); the API never starts engines. `on_change` wakes
    an in-process worker when a batch is created or cancelled."""
    settings = core.settings
    check_http_settings(settings.http)
    check_windows(settings.limits.windows())
    upload_checks = UploadChecks(router.shard_lines, settings.limits) if settings.limits.validate_on_upload else None
    files = FileService(core.store.files, core.files, upload_checks=upload_checks)
    batches = BatchService(
        core.store.batches, core.store.files, windows=settings.limits.windows(), on_change=on_change,
        progress=core.store.progress, upload_checks=upload_checks,
    )
    return Services(
        auth=load_authenticator(settings, core.store.keys, announce),
        files=files,
        batches=batches,
        uploads=UploadService(
            core.store.uploads, files, settings.limits.max_file_bytes, settings.limits.upload_expiry_seconds
        ),
        live_results=LiveResults(batches, core.store.results, core.store.files, core.files),
        retries=BatchRetries(batches, core.store.results, core.store.files, core.files),
        router=router,
        limits=settings.limits,
        overview=core.store.overview,
        rate_limiter=RateLimiter(settings.limits.requests_per_minute),
        auth_throttle=AuthFailureThrottle(
            settings.http.auth_failure_burst, settings.http.auth_failures_per_second,
            settings.http.auth_failure_addresses,
        ),
        metrics_dir=settings.metrics_dir,
        gauges=core.store.gauges,
    )


def load_authenticator(
    settings: Settings, store: SqlKeyStore, announce: Callable[[str], None] | None
) -> Authenticator:
    """The configured keys; with none configured, the key created on a first start (and with none
    created yet and someone to tell, `announce`, create one and print it once). A created key is a
    stand-in until keys are configured, not one of them: configuring keys is how it is revoked."""
    if any(len(key) > MAX_KEY_CHARS for key in (*settings.api_keys, *settings.admin_keys)):
        raise ConfigurationError(f"A configured API key is longer than {MAX_KEY_CHARS} characters, more than the "
                                 "server accepts from a client; use a shorter one.")
    created = store.stored_key_hashes()
    if not (settings.api_keys or settings.admin_keys):
        hashes = created
    else:
        hashes = {}
        if created and announce is not None:
            announce("The API key created on first start is no longer accepted: keys are configured "
                     "(--api-key/--admin-key). Its files and batches stay readable with an --admin-key.")
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


def check_windows(windows: dict[str, int]) -> None:
    """Completion windows must be named and last a whole, positive number of seconds."""
    for name, seconds in windows.items():
        if not isinstance(name, str) or not name or not isinstance(seconds, int) or isinstance(seconds, bool) \
                or seconds <= 0:
            raise ConfigurationError(f"completion window {name!r} = {seconds!r}: expected a name and a whole "
                                     "number of seconds above 0, e.g. \"1h\" = 3600.")


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
    if http.auth_failure_burst > 0 and http.auth_failures_per_second == 0:
        # The throttle's rate 0 would mean "off", not "never refills": say so instead of guessing.
        raise ConfigurationError("auth_failures_per_second must be above 0; to turn the throttle of failed "
                                 "authentications off, set auth_failure_burst to 0.")
