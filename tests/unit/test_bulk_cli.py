"""`tritonembed embed`'s command line: registered, every option explained, environment defaults, errors as exit 2."""

from __future__ import annotations

import json

import pytest

from tritonembed import cli
from tritonembed.launcher import free_port


def embed_parser():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["embed"]


def test_every_option_has_help():
    missing = [a.dest for a in embed_parser()._actions if a.dest != "help" and not a.help]
    assert not missing


def test_flags_read_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITONEMBED_URL", "a:8001,b:8001")
    monkeypatch.setenv("TRITONEMBED_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("TRITONEMBED_BATCH_SIZE", "7")
    args = cli.build_parser().parse_args(["embed", "in.jsonl"])
    assert (args.url, args.batch_size, args.engine, args.func.__name__) == ("a:8001,b:8001", 7, "local", "cmd_embed")


def test_missing_url_is_a_usage_error(monkeypatch):
    monkeypatch.delenv("TRITONEMBED_URL", raising=False)
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(["embed", "in.jsonl", "--output", "out"])
    assert caught.value.code == 2


def test_job_errors_exit_2_with_the_message(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": 1, "text": "   "}) + "\n")
    code = cli.main(["embed", str(source), "--output", str(tmp_path / "out"), "--url", f"127.0.0.1:{free_port()}",
                     "--no-progress"])
    assert code == 2
    assert "row 0 (line 1): 'text' is blank" in capsys.readouterr().err
