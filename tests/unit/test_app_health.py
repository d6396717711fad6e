"""/health of a server whose worker runs in the API process (`--workers 0`): a worker that ended
is reported in the log and by /health (a worker that failed before its loops ran was silent, and
/health said 200 while no batch could ever run)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from overnight.api.app import create_app
from overnight.settings import EmbeddedSettings, Settings
from overnight.wiring import build


def test_an_in_process_worker_that_ended_makes_health_503(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    parts = build(Settings(data_dir=tmp_path, embedded=EmbeddedSettings(enabled=False)), announce=None)

    async def failing_worker(stop: asyncio.Event) -> None:
        raise ConnectionError("could not join the database")

    app = create_app(parts.services, background=failing_worker)
    answers = []
    try:
        with caplog.at_level(logging.ERROR, logger="overnight"):
            client = TestClient(app)
            client.__enter__()
            try:
                answers.append(client.get("/health"))
            finally:
                # the lifespan's shutdown awaits the worker's task, and so raises its error
                with pytest.raises(ConnectionError):
                    client.__exit__(None, None, None)
    finally:
        asyncio.run(parts.close())
    assert answers[0].status_code == 503
    assert "it stopped" in answers[0].json()["error"]["message"]
    assert "the worker stopped: ConnectionError('could not join the database')" in caplog.text


def test_a_running_in_process_worker_is_ready(tmp_path: Path) -> None:
    parts = build(Settings(data_dir=tmp_path, embedded=EmbeddedSettings(enabled=False)), announce=None)

    async def worker(stop: asyncio.Event) -> None:
        await stop.wait()

    try:
        with TestClient(create_app(parts.services, background=worker)) as client:
            assert client.get("/health").status_code == 200
    finally:
        asyncio.run(parts.close())


def test_health_waits_for_worker_processes_beside_their_supervisor(tmp_path: Path) -> None:
    """With worker processes, the background task is their supervisor: its running says nothing of
    the processes' readiness (the check of the task replaced theirs, /health said 200 before any
    worker could answer, and an online request got 503 'No worker process is ready')."""
    parts = build(Settings(data_dir=tmp_path, embedded=EmbeddedSettings(enabled=False)), announce=None)
    processes_ready = [False]
    parts.services.workers_ready = lambda: processes_ready[0]

    async def supervise(stop: asyncio.Event) -> None:
        await stop.wait()

    try:
        with TestClient(create_app(parts.services, background=supervise)) as client:
            assert client.get("/health").status_code == 503
            processes_ready[0] = True
            assert client.get("/health").status_code == 200
    finally:
        asyncio.run(parts.close())
