"""The tables. One schema for SQLite and PostgreSQL; Alembic migrations create it (see migrations/)."""

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL wants BIGINT for big queues.
AutoId = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    # sha256 of the key: the key itself is never stored.
    Column("key_hash", String(64), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("created_at", BigInteger, nullable=False),
)

files = Table(
    "files",
    metadata,
    # seq orders lists (created_at has one-second resolution); id is what clients see.
    Column("seq", AutoId, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("owner", String(64), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("filename", Text, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Column("storage_key", Text, nullable=False),
    # Deleted files disappear from the API at once; their bytes go when no active batch reads them.
    Column("deleted_at", BigInteger, nullable=True),
    # A clean batch input's validation on upload (batches/upload_check.py), read by batches.create
    # only: lists leave it out.
    Column("upload_check", Text, nullable=True),
    Index("ix_files_owner_seq", "owner", "seq"),
    # Housekeeping looks files up by storage key and by when they died (migration 0013).
    Index("ix_files_storage_key", "storage_key"),
    Index("ix_files_deleted_at", "deleted_at"),
    Index("ix_files_expires_at", "expires_at"),
)

batches = Table(
    "batches",
    metadata,
    Column("seq", AutoId, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("owner", String(64), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("in_progress_at", BigInteger),
    Column("expires_at", BigInteger),
    Column("finalizing_at", BigInteger),
    Column("completed_at", BigInteger),
    Column("failed_at", BigInteger),
    Column("expired_at", BigInteger),
    Column("cancelling_at", BigInteger),
    Column("cancelled_at", BigInteger),
    Column("output_file_id", String(64)),
    Column("error_file_id", String(64)),
    Column("errors_json", Text),
    Column("metadata_json", Text),
    Column("model", Text),
    Column("output_expires_after", BigInteger),
    Column("request_total", BigInteger, nullable=False, default=0),
    Column("request_completed", BigInteger, nullable=False, default=0),
    Column("request_failed", BigInteger, nullable=False, default=0),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    # Lease on the batch-level phases (validating, finalizing): a dead holder's work is taken over.
    Column("lease_token", String(32)),
    Column("lease_expires_at", Float),
    # What a finished batch came to: {"completed", "failed", "errors_by_code"} (JSON), set at finalize.
    Column("outcome_json", Text),
    # The batch whose failed lines this one re-runs (POST /v1/batches/{id}/retry).
    Column("retry_of", String(64)),
    # The x-request-id of the API call that created the batch: worker log lines carry it.
    Column("request_id", String(64)),
    Index("ix_batches_owner_seq", "owner", "seq"),
    Index("ix_batches_status", "status"),
    Index("ix_batches_retry_of", "retry_of"),
)

shards = Table(
    "shards",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("batch_id", String(64), nullable=False),
    Column("shard_index", Integer, nullable=False),
    # Requests first_request .. first_request+request_count-1 (0-based, blank lines not counted),
    # stored in bytes byte_offset .. byte_offset+byte_length of the input file.
    Column("first_request", BigInteger, nullable=False),
    Column("request_count", Integer, nullable=False),
    Column("byte_offset", BigInteger, nullable=False),
    Column("byte_length", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempt", Integer, nullable=False, default=0),
    # Of those claims, the ones handed back unfinished (an outage, a graceful stop): a claim that
    # dies counts against max_shard_attempts, one handed back does not.
    Column("handed_back", Integer, nullable=False, default=0, server_default="0"),
    Column("lease_token", String(32)),
    Column("lease_expires_at", Float),
    # Committed results: one object per (shard, attempt), written before the commit that names it.
    Column("result_key", Text),
    # The results object holds the output lines, then the error lines: the first this many bytes
    # are the output section, so finalize copies byte ranges instead of splitting lines.
    Column("result_output_bytes", BigInteger),
    Column("completed", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    Column("model", Text),
    # Lines not run because the completion window closed: the batch then ends `expired`.
    Column("expired", Integer, nullable=False, default=0, server_default="0"),
    # Why the last attempt failed (an exception in the worker, not a line's error). The same
    # failure twice settles the shard as `failed`: its lines are reported, not retried forever.
    Column("last_error", Text),
    # {code: count} of the committed error lines (JSON), summed into the batch's outcome.
    Column("error_codes", Text),
    # When the current attempt was claimed and committed (the database's clock): a batch's
    # throughput over the last minute is read from these and the live counts (batches/progress.py).
    Column("started_at", Float),
    Column("finished_at", Float),
    UniqueConstraint("batch_id", "shard_index", name="uq_shards_batch_index"),
    # The claim reads pending shards in round-robin order across batches, and stops at the first.
    Index("ix_shards_claim_order", "status", "shard_index", "id"),
    Index("ix_shards_batch_status", "batch_id", "status"),
    Index("ix_shards_result_key", "result_key"),  # housekeeping: is this object a shard's results?
)

workers = Table(
    "workers",
    metadata,
    # One row per running worker process, whatever machine it is on: how many there are decides
    # each one's share of every upstream's max_concurrency (the configured maximum is a total).
    Column("id", String(32), primary_key=True),
    Column("started_at", Float, nullable=False),  # the database's clock
    Column("last_seen", Float, nullable=False),  # extended by the worker's heartbeat
)

uploads = Table(
    "uploads",
    metadata,
    # An Upload (POST /v1/uploads): a file that arrives in parts and becomes a File when completed.
    Column("id", String(64), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("filename", Text, nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),  # declared at creation; the parts must add up to it
    Column("mime_type", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    # pending, completed, cancelled, or expired (set by housekeeping when it removes the parts;
    # a pending upload past expires_at reads as expired before that).
    Column("status", String(16), nullable=False),
    # The File's own expiry, as asked at creation (`expires_after[seconds]`; None: the default).
    Column("file_expires_after", BigInteger, nullable=True),
    Column("file_id", String(64), nullable=True),  # the File made by completing it
    Index("ix_uploads_expires_at", "expires_at"),
)

upload_parts = Table(
    "upload_parts",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("upload_id", String(64), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("storage_key", Text, nullable=False),
    Index("ix_upload_parts_upload", "upload_id"),
    Index("ix_upload_parts_storage_key", "storage_key"),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    # One row per (event, endpoint): inserted in the transaction that puts the batch in its
    # terminal state, so an event is never lost between the state change and its delivery.
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False),
    Column("event_type", String(32), nullable=False),
    Column("owner", String(64), nullable=False),
    Column("batch_id", String(64), nullable=False),
    # The configured endpoint this row is for (its secret is looked up there when sending).
    Column("endpoint_id", String(64), nullable=False),
    Column("url", Text, nullable=False),
    # The exact body: every attempt sends the same bytes (only the timestamp and signature change).
    Column("payload", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    # pending -> delivered | failed (given up).
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    # When it is next due, on the database's clock. A claim moves it a lease ahead, so a delivery
    # whose sender died is due again once that lease runs out.
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_token", String(32)),
    Column("delivered_at", Float),
    Column("last_error", Text),
    UniqueConstraint("event_id", "endpoint_id", name="uq_webhook_deliveries_event_endpoint"),
    # The claim scans pending rows by due time.
    Index("ix_webhook_deliveries_status_due", "status", "next_attempt_at"),
)
