"""An HTTPS upstream: its certificate is verified, and a private CA is trusted through the
upstream's `ca_file`. The upstream is a real TLS server process on 127.0.0.1; the certificates
are made here with the openssl command (a CA, and a server certificate it signs for 127.0.0.1)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import Upstream, chat_line, results_by_id, run_batch, serve_refused


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(server certificate, server key, CA certificate)."""
    d = tmp_path_factory.mktemp("tls")
    ca_key, ca, key, csr, cert, ext = (d / n for n in ("ca.key", "ca.pem", "server.key", "server.csr",
                                                        "server.pem", "server.ext"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
             "-days", "2", "-subj", "/CN=overnight test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return cert, key, ca


def test_an_https_upstream_with_a_private_ca(
    tmp_path: Path, workdir: Path, make_server: Any, certificates: tuple[Path, Path, Path]
) -> None:
    secure = Upstream(workdir, tls=certificates)
    try:
        config = tmp_path / "overnight.toml"
        config.write_text(
            "[[upstreams]]\n"
            f'base_url = "{secure.base_url}"\n'
            f'ca_file = "{certificates[2]}"\n'
            'models = ["trusted-*"]\n'
            "[[upstreams]]\n"  # the same server without the CA: its certificate must not verify
            f'base_url = "{secure.base_url}"\n'
            'models = ["untrusted-*"]\n'
            "[upstreams.retry]\n"
            "max_attempts = 1\n"
        )
        client = make_server("--config", str(config), "--no-fallback", routes=()).client()
        done = run_batch(client, [chat_line(1, model="trusted-model"), chat_line(2, model="untrusted-model")])
        outputs, errors = results_by_id(client, done)
        assert outputs["req-1"]["response"]["status_code"] == 200
        assert outputs["req-1"]["response"]["body"]["model"] == "trusted-model"
        assert errors["req-2"]["error"]["code"] == "upstream_unreachable"
        assert "invalid peer certificate" in errors["req-2"]["error"]["message"]  # says what is wrong
        assert secure.stats()["requests"] == 1  # the untrusted route never got a request through
    finally:
        secure.stop()


def test_an_unreadable_ca_file_stops_the_server_with_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "overnight.toml"
    config.write_text('[[upstreams]]\nbase_url = "https://127.0.0.1:1/v1"\nca_file = "/nonexistent/ca.pem"\n')
    stderr = serve_refused("--data-dir", str(tmp_path / "data"), "--config", str(config), "--no-embedded")
    assert "Cannot read the upstream ca_file /nonexistent/ca.pem" in stderr
