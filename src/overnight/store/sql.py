"""The SQL store: one database, its adapters by concern. SQLite by default, PostgreSQL by URL."""

from __future__ import annotations

from overnight.store.batches import SqlBatchCatalog
from overnight.store.database import Database
from overnight.store.files import SqlFileCatalog
from overnight.store.gauges import SqlQueueGauges
from overnight.store.housekeeping import SqlHousekeeping
from overnight.store.keys import SqlKeyStore
from overnight.store.membership import SqlMembership
from overnight.store.overview import SqlOverview
from overnight.store.progress import SqlProgress
from overnight.store.queue import SqlWorkQueue
from overnight.store.results import SqlResultsCatalog
from overnight.store.uploads import SqlUploadStore
from overnight.store.webhooks import SqlWebhookOutbox


class SqlStore:
    """What a process needs of the database, by concern (each a port's adapter)."""

    def __init__(self, url: str) -> None:
        self.db = Database(url)
        self.keys = SqlKeyStore(self.db)
        self.files = SqlFileCatalog(self.db)
        self.batches = SqlBatchCatalog(self.db)
        self.queue = SqlWorkQueue(self.db)
        self.housekeeping = SqlHousekeeping(self.db)
        self.membership = SqlMembership(self.db)
        self.overview = SqlOverview(self.db)
        self.uploads = SqlUploadStore(self.db)
        self.webhooks = SqlWebhookOutbox(self.db)
        self.results = SqlResultsCatalog(self.db)
        self.gauges = SqlQueueGauges(self.db)
        self.progress = SqlProgress(self.db)

    def migrate(self) -> None:
        self.db.migrate()

    def close(self) -> None:
        self.db.close()
