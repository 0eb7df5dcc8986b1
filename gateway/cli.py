"""``python -m tritonembed.gateway`` / :func:`main`: flags that fall back to ``TRITONEMBED_*`` variables."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tritonembed.gateway.settings import GatewaySettings, SettingsError, load_api_key_file


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The gateway's flags (reusable by ``tritonembed gateway``). Every flag defaults to None, so
    an unset flag keeps the value from the environment (see :mod:`tritonembed.gateway.settings`)."""
    parser = parser or argparse.ArgumentParser(
        prog="python -m tritonembed.gateway", description="OpenAI-compatible /v1/embeddings gateway in front of Triton."
    )
    parser.add_argument("--triton-url", help="Triton address; grpc://, http:// or host:port (env TRITONEMBED_TRITON_URL)")
    parser.add_argument("--protocol", choices=("grpc", "http"), help="protocol when the URL has no scheme (default grpc)")
    parser.add_argument("--host", help="interface to listen on (env TRITONEMBED_GATEWAY_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (env TRITONEMBED_GATEWAY_PORT, default 8080)")
    parser.add_argument("--api-key-file", type=Path, help="file with one API key per line (env TRITONEMBED_API_KEY_FILE)")
    parser.add_argument("--max-request-bytes", type=int, help="largest request body (env TRITONEMBED_MAX_REQUEST_BYTES)")
    parser.add_argument("--max-inputs", type=int, help="most inputs per request (env TRITONEMBED_MAX_INPUTS)")
    parser.add_argument("--max-pending-inputs", type=int,
                        help="inputs in flight before requests get 429 overloaded (env TRITONEMBED_MAX_PENDING_INPUTS)")
    parser.add_argument("--timeout", type=float, dest="request_timeout", help="seconds per Triton request")
    parser.add_argument(
        "--model-dir", type=Path, action="append", dest="model_dirs", help="exported model dir; enables token-id input (repeatable)"
    )
    parser.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"))
    return parser


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
