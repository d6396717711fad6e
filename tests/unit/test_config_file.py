"""The TOML config file: every example in the README loads as it says, and a key or value that
cannot work is refused with a message naming it (never a traceback, never a wrong reading)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from overnight.settings import RetrySettings, Settings, load_config_file

README = Path(__file__).resolve().parents[2] / "README.md"


def _load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "overnight.toml"
    path.write_text(text)
    return load_config_file(path, Settings(data_dir=tmp_path))


def test_every_toml_example_in_the_readme_loads(tmp_path: Path) -> None:
    examples = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    assert len(examples) >= 2
    loaded = [_load(tmp_path, text) for text in examples]
    first = loaded[0]
    assert first.upstreams[0].models == ("llama-3-*", "qwen*")
    assert first.upstreams[0].retry == RetrySettings(max_attempts=8, base_delay=0.5, max_delay=30.0)
    assert first.aliases == {"gpt-4o-mini": "llama-3-8b-instruct"} and first.worker.nice == 10
    assert first.embedded.weights == "Q8_0" and first.http.auth_failures_per_second == 1.0
    webhooks = next(s for s in loaded if s.webhooks)
    assert webhooks.webhooks[0].events == ("batch.completed", "batch.failed")
    assert webhooks.webhook_delivery.retry_delays[:2] == (5.0, 30.0)


@pytest.mark.parametrize(("text", "message"), [
    # A string where a list belongs was taken as a list of one-character keys: any key "s" got in.
    ('api_keys = "sk-team-a"', "api_keys must be a list"),
    ('admin_keys = "sk-admin"', "admin_keys must be a list"),
    ('api_keys = [""]', "api_keys: an API key cannot be empty"),
    ('fallback_to_default = "false"', "fallback_to_default must be true or false"),  # was bool("false")
    ("[limits]\nmax_file_size = 10", "limits: unknown key 'max_file_size'"),
    ('[limits]\nmax_file_bytes = "2GB"', "limits.max_file_bytes must be a whole number"),
    ('[http]\nheader_timeout_seconds = "10"', "http.header_timeout_seconds must be a number"),
    ('[[upstreams]]\nmodels = ["*"]', "upstreams[0]: 'base_url' is required"),
    ('[[upstreams]]\nbase_url = "http://x/v1"\nmax_concurrency = "128"',
     "upstreams[0].max_concurrency must be a whole number"),
    ('[[upstreams]]\nbase_url = "http://x/v1"\n[upstreams.retry]\nmax_attempts = 2.5',
     "upstreams[0].retry.max_attempts must be a whole number"),
    ("aliases = ['a']", "aliases must be a table"),
    ('[webhook_delivery]\nretry_delays = "5,30"', "webhook_delivery.retry_delays must be a list"),
    ('[[webhooks]]\nurl = "http://x"', "webhooks[0]: 'secret' is required"),
    ("upstream = 1", "unknown key 'upstream'"),
    ("[limits\n", "is not valid TOML"),
])
def test_a_key_or_value_that_cannot_work_is_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        _load(tmp_path, text)
    assert message in str(refused.value)


def test_a_key_an_earlier_version_read_loads_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`[embedded] online_slot` kept a slot free in deterministic mode, which now preempts instead:
    a config that sets it still starts, and says the key can go."""
    settings = _load(tmp_path, "[embedded]\nonline_slot = true\ndeterministic = true\n")
    assert settings.embedded.deterministic
    assert "[embedded] online_slot is no longer used" in caplog.text and "remove it" in caplog.text


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read the config file .*nope\.toml"):
        load_config_file(tmp_path / "nope.toml", Settings(data_dir=tmp_path))


def test_strings_where_toml_allows_one_item_and_integers_as_floats(tmp_path: Path) -> None:
    settings = _load(tmp_path, '[[upstreams]]\nbase_url = "http://x/v1"\nmodels = "gpt-*"\ntimeout_seconds = 60\n'
                               '[[webhooks]]\nurl = "http://h"\nsecret = "whsec_x"\nevents = "batch.failed"\n')
    assert settings.upstreams[0].models == ("gpt-*",) and settings.upstreams[0].timeout_seconds == 60.0
    assert isinstance(settings.upstreams[0].timeout_seconds, float)
    assert settings.webhooks[0].events == ("batch.failed",)
