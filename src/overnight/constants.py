"""Names of states, endpoints and limits shared by every layer."""

from typing import Final

# The endpoints a batch line may target, as OpenAI spells them.
CHAT_COMPLETIONS: Final = "/v1/chat/completions"
COMPLETIONS: Final = "/v1/completions"
EMBEDDINGS: Final = "/v1/embeddings"
RESPONSES: Final = "/v1/responses"
MODERATIONS: Final = "/v1/moderations"
# In the order of the `endpoint` enum in OpenAI's spec; an unsupported endpoint's message lists them so.
SUPPORTED_ENDPOINTS: Final = (RESPONSES, CHAT_COMPLETIONS, EMBEDDINGS, COMPLETIONS, MODERATIONS)

COMPLETION_WINDOWS: Final = {"24h": 24 * 3600}
# A batch due within this long is urgent: the shard claim serves urgent batches before those
# with slack (round-robin within each tier). 3 h: a 1h batch is urgent from the start, a 24h or
# 7d one for its last three hours.
DEADLINE_HORIZON_SECONDS: Final = 3 * 3600

# Batch states: OpenAI's, no invented ones.
VALIDATING: Final = "validating"
FAILED: Final = "failed"
IN_PROGRESS: Final = "in_progress"
FINALIZING: Final = "finalizing"
COMPLETED: Final = "completed"
EXPIRED: Final = "expired"
CANCELLING: Final = "cancelling"
CANCELLED: Final = "cancelled"
# What a wake-up says changed: a batch was created `validating` (a worker claims its validation),
# created `in_progress` with its shards (input validated on upload: only shards to claim), or
# cancelled (workers stop its shards).
CHANGE_CREATED: Final = "created"
CHANGE_STARTED: Final = "started"
CHANGE_CANCELLED: Final = "cancelled"
TERMINAL_STATES: Final = frozenset({FAILED, COMPLETED, EXPIRED, CANCELLED})
ACTIVE_STATES: Final = frozenset({VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING})

# Shard states. A shard is settled when it is done (results committed) or skipped (never ran:
# its lines are reported as cancelled or expired at finalize time).
SHARD_PENDING: Final = "pending"
SHARD_RUNNING: Final = "running"
SHARD_DONE: Final = "done"
SHARD_SKIPPED: Final = "skipped"
# Gave up: the same failure twice, or too many attempts; its lines are reported with SHARD_FAILED_CODE.
SHARD_FAILED: Final = "failed"
SHARD_FAILED_CODE: Final = "shard_failed"

# File purposes accepted on upload (SDK FilePurpose), and the one we write.
UPLOAD_PURPOSES: Final = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
BATCH_OUTPUT_PURPOSE: Final = "batch_output"

# How long the row of a deleted or expired file outlives its bytes: a client paging through
# `files.list(after=<id>)` while it deletes those files (the SDK pages with the last id it saw) still
# finds its cursor (store/housekeeping.py).
GONE_FILE_ROW_SECONDS: Final = 24 * 3600
FILE_EXPIRY_MIN_SECONDS: Final = 3600
FILE_EXPIRY_MAX_SECONDS: Final = 30 * 24 * 3600
BATCH_FILE_DEFAULT_TTL: Final = 30 * 24 * 3600

# Longer names are refused at validation: a model name is a routing key kept in caches.
MAX_MODEL_NAME_CHARS: Final = 256
METADATA_MAX_PAIRS: Final = 16
METADATA_MAX_KEY: Final = 64
METADATA_MAX_VALUE: Final = 512

# Per-line error codes that have no HTTP response behind them.
BATCH_EXPIRED: Final = "batch_expired"
BATCH_CANCELLED: Final = "batch_cancelled"
# A line whose run raised inside overnight (a bug, or input no engine could take): its error says what.
ENGINE_ERROR: Final = "engine_error"

# Uploads (POST /v1/uploads): a file sent in parts of at most 64 MB (OpenAI's limit per part).
UPLOAD_PENDING: Final = "pending"
UPLOAD_COMPLETED: Final = "completed"
UPLOAD_CANCELLED: Final = "cancelled"
UPLOAD_EXPIRED: Final = "expired"
UPLOAD_PART_MAX_BYTES: Final = 64 * 1024 * 1024
