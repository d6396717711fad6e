"""`--storage-url`: the URL's query first, then the standard AWS variables, then defaults; mistakes
are refused with what to fix, and never with a secret in the message or the repr."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from overnight.cli import _parser, settings_from
from overnight.settings import Settings, parse_storage_url

MiB = 1024 * 1024


def test_everything_in_the_url() -> None:
    loc = parse_storage_url(
        "s3://my-bucket/some/prefix/?endpoint=http://127.0.0.1:8333&region=eu-west-1"
        "&access_key=AK&secret_key=a%2Fb+c%3D&part_size_mib=16&conditional=false",
        {"AWS_ACCESS_KEY_ID": "env-key", "AWS_SECRET_ACCESS_KEY": "env-secret", "AWS_REGION": "us-west-2"},
    )
    assert (loc.bucket, loc.prefix, loc.endpoint_url, loc.region) == (
        "my-bucket", "some/prefix", "http://127.0.0.1:8333", "eu-west-1")
    assert (loc.access_key, loc.secret_key) == ("AK", "a/b+c=")  # '+' stays '+'
    assert loc.part_size == 16 * MiB and loc.conditional_writes is False
    assert "a/b+c=" not in repr(loc) and "AK" not in repr(loc)


def test_the_aws_variables_fill_in() -> None:
    env = {"AWS_ACCESS_KEY_ID": "env-key", "AWS_SECRET_ACCESS_KEY": "env-secret", "AWS_SESSION_TOKEN": "tok",
           "AWS_ENDPOINT_URL": "https://s3.example.com/", "AWS_DEFAULT_REGION": "ap-south-1"}
    loc = parse_storage_url("s3://b", env)
    assert (loc.bucket, loc.prefix, loc.endpoint_url, loc.region) == ("b", "", "https://s3.example.com", "ap-south-1")
    assert (loc.access_key, loc.secret_key, loc.session_token) == ("env-key", "env-secret", "tok")
    assert parse_storage_url("s3://b", {**env, "AWS_ENDPOINT_URL_S3": "http://s3only:1"}).endpoint_url == "http://s3only:1"
    assert parse_storage_url("s3://b", {**env, "AWS_REGION": "eu-north-1"}).region == "eu-north-1"


def test_defaults() -> None:
    loc = parse_storage_url("s3://b/p", {})
    assert (loc.endpoint_url, loc.region, loc.access_key, loc.secret_key) == (None, "us-east-1", None, None)
    assert loc.part_size == 8 * MiB and loc.conditional_writes


@pytest.mark.parametrize(("url", "says"), [
    ("file:///tmp/x", "unsupported storage URL scheme"),
    ("/var/data", "unsupported storage URL scheme"),
    ("s3:///prefix", "needs a bucket"),
    ("s3://AK:Xy7secret@bucket/p", "needs a bucket"),
    ("s3://b?endpont=http://x", "unknown storage URL parameter 'endpont'"),
    ("s3://b?endpoint=127.0.0.1:8333", "must start with http://"),
    ("s3://b?access_key=AK", "both access_key and secret_key"),
    ("s3://b?part_size_mib=4", "at least 5"),
    ("s3://b?part_size_mib=lots", "must be a number"),
    ("s3://b?conditional=maybe", "true or false"),
])
def test_mistakes_are_refused(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as caught:
        parse_storage_url(url, {})
    assert "Xy7secret" not in str(caught.value)


def _settings(argv: list[str], env: dict[str, str]) -> Settings:
    args: argparse.Namespace = _parser().parse_args(argv)
    return settings_from(args, env)


def test_the_flag_the_variable_and_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "overnight.toml"
    config.write_text('storage_url = "s3://from-config/p"\n')
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "HOME": "/root"}
    assert _settings(["worker"], env).storage_url is None  # default: the data directory
    assert _settings(["worker", "--config", str(config)], env).storage_url == "s3://from-config/p"
    assert _settings(["worker", "--config", str(config)], {**env, "OVERNIGHT_STORAGE_URL": "s3://from-env"}
                     ).storage_url == "s3://from-env"
    settings = _settings(["serve", "--storage-url", "s3://from-flag", "--config", str(config)], env)
    assert settings.storage_url == "s3://from-flag"
    assert settings.storage_env == {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}  # only AWS_*
    assert "storage" not in repr(settings)  # neither the URL (it may hold a key) nor the variables
    for command in ("run", "cleanup"):
        args = ["-i", "x", "-o", "y"] if command == "run" else []
        assert _settings([command, "--storage-url", "s3://b", *args], env).storage_url == "s3://b"
