"""Seeing what the server does: Prometheus metrics (metrics.py, scraped at GET /metrics) and
structured logs (logs.py). Every process builds its own metric objects; in `overnight serve` they
write to files in one directory (prometheus-client's multiprocess mode), so a scrape of the API
process counts the API and every worker process beside it."""
