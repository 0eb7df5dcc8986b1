"""``python -m tritonembed.gateway`` / :func:`main`: flags that fall back to ``TRITONEMBED_*`` variables."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tritonembed.gateway.settings import TOKEN_ID_MODES, GatewaySettings, SettingsError, load_api_key_file


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The gateway's flags (reusable by ``tritonembed gateway``). Every flag defaults to None, so
    an unset flag keeps the value from the environment (see :mod:`tritonembed.gateway.settings`)."""
    parser = parser or argparse.ArgumentParser(
        prog="python -m tritonembed.gateway", description="OpenAI-compatible /v1/embeddings gateway in front of Triton."
    )
    parser.add_argument("--triton-url", help="Triton address, or several replicas as A,B,...; grpc://, http:// or "
                                             "host:port (env TRITONEMBED_TRITON_URL)")
    parser.add_argument("--protocol", choices=("grpc", "http"), help="protocol when the URL has no scheme (default grpc)")
    parser.add_argument("--host", help="interface to listen on (env TRITONEMBED_GATEWAY_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (env TRITONEMBED_GATEWAY_PORT, default 8080)")
    parser.add_argument("--api-key-file", type=Path, help="file with one API key per line (env TRITONEMBED_API_KEY_FILE)")
    parser.add_argument("--max-request-bytes", type=int, help="largest request body (env TRITONEMBED_MAX_REQUEST_BYTES)")
    parser.add_argument("--max-inputs", type=int, help="most inputs per request (env TRITONEMBED_MAX_INPUTS)")
    parser.add_argument("--max-pending-inputs", type=int,
                        help="inputs in flight before requests get 429 overloaded (env TRITONEMBED_MAX_PENDING_INPUTS)")
    parser.add_argument("--timeout", type=float, dest="request_timeout", help="seconds per Triton request")
    parser.add_argument("--request-deadline", type=float,
                        help="seconds one API request may take in all, else 504 (env TRITONEMBED_REQUEST_DEADLINE, default 120)")
    parser.add_argument("--header-timeout", type=float,
                        help="seconds a client has to send its request headers (env TRITONEMBED_HEADER_TIMEOUT, default 10)")
    parser.add_argument("--body-timeout", type=float,
                        help="seconds a client has to send its request body (env TRITONEMBED_BODY_TIMEOUT, default 30)")
    parser.add_argument("--max-connections", type=int,
                        help="open connections before requests get 503 (env TRITONEMBED_MAX_CONNECTIONS, default 1024)")
    add_token_ids_flag(parser)
    parser.add_argument(
        "--model-dir", type=Path, action="append", dest="model_dirs",
        help="exported model dir whose tokenizer --token-ids native decodes with (repeatable)",
    )
    parser.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def add_token_ids_flag(parser: argparse.ArgumentParser) -> None:
    """``--token-ids`` (shared with ``tritonembed serve``); None keeps ``TRITONEMBED_TOKEN_IDS``."""
    parser.add_argument(
        "--token-ids", choices=TOKEN_ID_MODES,
        help="token-id input: off (refused with a 400, the default), tiktoken:cl100k_base (decode OpenAI/LangChain "
             "ids with tiktoken), native (decode with the model's own tokenizer, needs --model-dir) "
             "(env TRITONEMBED_TOKEN_IDS)",
    )


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    """Environment first, then the flags that were given.

    Raises:
        SettingsError: an invalid value.
    """
    settings = GatewaySettings.from_env()
    keys = None
    if getattr(args, "api_key_file", None):
        keys = tuple(dict.fromkeys(settings.api_keys + tuple(load_api_key_file(args.api_key_file))))
    return settings.replace(
        triton_url=args.triton_url,
        protocol=args.protocol,
        host=args.host,
        port=args.port,
        api_keys=keys,
        max_request_bytes=args.max_request_bytes,
        max_inputs=args.max_inputs,
        max_pending_inputs=args.max_pending_inputs,
        request_timeout=args.request_timeout,
        request_deadline=args.request_deadline,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        max_connections=args.max_connections,
        token_ids=args.token_ids,
        model_dirs=tuple(args.model_dirs) if args.model_dirs else None,
        log_level=args.log_level,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)  # CLI usage error, before logging is configured
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tritonembed.gateway.server import run_gateway

    run_gateway(settings)
    return 0
