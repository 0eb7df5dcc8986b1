"""Gateway settings from TRITONEMBED_* variables, key files and CLI flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from tritonembed.gateway import GatewaySettings, SettingsError, build_parser, settings_from_args
from tritonembed.gateway.settings import load_api_key_file


def test_defaults():
    s = GatewaySettings.from_env({})
    assert s == GatewaySettings()
    assert s.triton_url == "localhost:8001" and s.port == 8080 and not s.auth_enabled
    assert "api_keys" not in repr(s)  # keys never end up in logs


def test_from_env(tmp_path: Path):
    key_file = tmp_path / "keys"
    key_file.write_text("# comment\nfile-key-1\n\n  file-key-2  \nenv-key\n", encoding="utf-8")
    env = {
        "TRITONEMBED_TRITON_URL": "http://triton:8000",
        "TRITONEMBED_GATEWAY_HOST": "0.0.0.0",
        "TRITONEMBED_GATEWAY_PORT": "9000",
        "TRITONEMBED_API_KEYS": "env-key, other-key ,",
        "TRITONEMBED_API_KEY_FILE": str(key_file),
        "TRITONEMBED_MAX_REQUEST_BYTES": "1024",
        "TRITONEMBED_MAX_INPUTS": "16",
        "TRITONEMBED_REQUEST_TIMEOUT": "2.5",
        "TRITONEMBED_MODEL_DIRS": f"/a{__import__('os').pathsep}/b",
        "TRITONEMBED_LOG_LEVEL": "debug",
        "UNRELATED": "x",
    }
    s = GatewaySettings.from_env(env)
    assert s.triton_url == "http://triton:8000" and s.host == "0.0.0.0" and s.port == 9000
    assert s.api_keys == ("env-key", "other-key", "file-key-1", "file-key-2")
    assert (s.max_request_bytes, s.max_inputs, s.request_timeout) == (1024, 16, 2.5)
    assert s.model_dirs == (Path("/a"), Path("/b")) and s.log_level == "debug"
    assert GatewaySettings.from_env(env, port=1234, host=None).port == 1234  # overrides, None = keep
    assert GatewaySettings.from_env(env, port=1234, host=None).host == "0.0.0.0"


@pytest.mark.parametrize(
    "env",
    [
        {"TRITONEMBED_GATEWAY_PORT": "http"},
        {"TRITONEMBED_GATEWAY_PORT": "70000"},
        {"TRITONEMBED_MAX_INPUTS": "0"},
        {"TRITONEMBED_REQUEST_TIMEOUT": "soon"},
        {"TRITONEMBED_API_KEY_FILE": "/does/not/exist"},
    ],
)
def test_bad_env(env):
    with pytest.raises(SettingsError):
        GatewaySettings.from_env(env)


def test_key_file(tmp_path: Path):
    path = tmp_path / "k"
    path.write_text("a\n#b\n c \n", encoding="utf-8")
    assert load_api_key_file(path) == ["a", "c"]


def test_cli_flags_override_env(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TRITONEMBED_TRITON_URL", "from-env:8001")
    monkeypatch.setenv("TRITONEMBED_GATEWAY_PORT", "7000")
    monkeypatch.setenv("TRITONEMBED_API_KEYS", "env-key")
    keys = tmp_path / "keys"
    keys.write_text("cli-key\n", encoding="utf-8")
    args = build_parser().parse_args(["--port", "7100", "--api-key-file", str(keys), "--model-dir", "/m1", "--model-dir", "/m2"])
    s = settings_from_args(args)
    assert s.triton_url == "from-env:8001" and s.port == 7100
    assert s.api_keys == ("env-key", "cli-key")
    assert s.model_dirs == (Path("/m1"), Path("/m2"))


def test_timeouts_limits_and_token_ids_from_env_and_flags():
    env = {
        "TRITONEMBED_REQUEST_DEADLINE": "90",
        "TRITONEMBED_HEADER_TIMEOUT": "5",
        "TRITONEMBED_BODY_TIMEOUT": "20",
        "TRITONEMBED_MAX_CONNECTIONS": "64",
        "TRITONEMBED_TOKEN_IDS": "tiktoken:cl100k_base",
    }
    s = GatewaySettings.from_env(env)
    assert (s.request_deadline, s.header_timeout, s.body_timeout, s.max_connections, s.token_ids) == (
        90.0, 5.0, 20.0, 64, "tiktoken:cl100k_base")
    d = GatewaySettings()
    assert (d.request_deadline, d.header_timeout, d.body_timeout, d.max_connections, d.token_ids) == (120.0, 10.0, 30.0, 1024, "off")
    for bad in ({"header_timeout": 0}, {"body_timeout": -1}, {"request_deadline": 0}, {"max_connections": 0}):
        with pytest.raises(SettingsError):
            GatewaySettings(**bad)
    with pytest.raises(SettingsError, match="TRITONEMBED_HEADER_TIMEOUT"):
        GatewaySettings.from_env({"TRITONEMBED_HEADER_TIMEOUT": "soon"})
    args = build_parser().parse_args(["--header-timeout", "2", "--body-timeout", "3", "--request-deadline", "4",
                                      "--max-connections", "5", "--token-ids", "native", "--model-dir", "/m"])
    s = settings_from_args(args)
    assert (s.header_timeout, s.body_timeout, s.request_deadline, s.max_connections, s.token_ids) == (2.0, 3.0, 4.0, 5, "native")


def test_several_triton_urls_are_split_and_checked():
    settings = GatewaySettings.from_env({"TRITONEMBED_TRITON_URL": "grpc://a:8001, http://b:8000 ,"})
    assert settings.triton_urls == ["grpc://a:8001", "http://b:8000"]
    assert GatewaySettings(triton_url="a:8001").triton_urls == ["a:8001"]
    with pytest.raises(SettingsError, match="twice"):
        GatewaySettings(triton_url="a:8001,grpc://a:8001")
    with pytest.raises(SettingsError, match="no Triton URL"):
        GatewaySettings(triton_url=" , ")
    with pytest.raises(SettingsError, match="scheme"):
        GatewaySettings(triton_url="a:8001,ftp://b:1")
