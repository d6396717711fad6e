"""HTTP: the FastAPI app factory, the /v1/files and /v1/batches routes, auth and the OpenAI error
envelope. Knows nothing of SQL or engines beyond the services it is handed."""

from overnight.api.app import create_app
from overnight.api.services import Services

__all__ = ["Services", "create_app"]
