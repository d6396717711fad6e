"""What the routes need, built once by the app factory and kept on `app.state.services`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from overnight.api.auth import Authenticator
from overnight.api.auth_throttle import AuthFailureThrottle
from overnight.api.rate_limit import RateLimiter
from overnight.batches.file_service import FileService
from overnight.batches.live_results import LiveResults
from overnight.batches.ports import QueueGauges, ServerOverview
from overnight.batches.retry import BatchRetries
from overnight.batches.service import BatchService
from overnight.batches.upload_service import UploadService
from overnight.engines.router import Router
from overnight.observability.metrics import ApiMetrics
from overnight.online.port import OnlineAnswerer
from overnight.settings import Limits


@dataclass(slots=True)
class Services:
    auth: Authenticator
    files: FileService
    batches: BatchService
    uploads: UploadService
    live_results: LiveResults
    retries: BatchRetries
    router: Router
    limits: Limits
    overview: ServerOverview  # queue depth and workers, for the admin server page
    rate_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0))
    auth_throttle: AuthFailureThrottle = field(default_factory=lambda: AuthFailureThrottle(0, 0.0, 1))
    ready: bool = False
    # Whether the worker processes beside this API can claim work (always, when there are none).
    workers_ready: Callable[[], bool] = lambda: True
    # GET /metrics: this process's request metrics, the directory every process of the server writes
    # its values to (None: only this process's store gauges are served), and the store's gauges.
    metrics: ApiMetrics = field(default_factory=ApiMetrics)
    metrics_dir: Path | None = None
    gauges: QueueGauges | None = None
    # Online requests (POST /v1/chat/completions, ...): answered on this process's engines, or by
    # a worker process's; None answers 503.
    online: OnlineAnswerer | None = None
