"""The domain: input validation, the batch lifecycle, finalizing. Pure logic over the ports."""

from overnight.batches.errors import Conflict, InvalidRequest, NotFound, OvernightError, PayloadTooLarge
from overnight.batches.file_service import FileService
from overnight.batches.service import BatchService

__all__ = [
    "BatchService",
    "Conflict",
    "FileService",
    "InvalidRequest",
    "NotFound",
    "OvernightError",
    "PayloadTooLarge",
]
