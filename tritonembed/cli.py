"""The ``tritonembed`` command line. Every flag also reads ``TRITONEMBED_<FLAG>`` from the environment.

Heavy imports (torch, transformers, onnxruntime) happen inside the sub-command that needs them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tritonembed import embed_cli, launcher_cli, precisions
from tritonembed.benchmarks import cli as bench_cli
from tritonembed.cli_options import Parser, add_static_shapes_flag, env_default
from tritonembed.errors import TritonEmbedError
from tritonembed.spec import INT4_ACTIVATIONS, TASKS

log = logging.getLogger("tritonembed")

DESCRIPTION = """Serve sentence-embedding models on NVIDIA Triton Inference Server.

Every flag also reads TRITONEMBED_<FLAG> from the environment (TRITONEMBED_HTTP_PORT=9000).
Start with:  tritonembed serve            (exports all-MiniLM-L6-v2 on first use, serves it)
             tritonembed COMMAND --help   (every option of a command, with its default)"""

def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a Hugging Face checkpoint to a validated ONNX directory")
    p.add_argument("model", help="local Hugging Face directory or model id (e.g. sentence-transformers/all-MiniLM-L6-v2, "
                                 "Qwen/Qwen3-Embedding-4B, random-qwen3:tiny)")
    p.add_argument("--precision", choices=precisions.NAMES, default=env_default("precision", "fp32"),
                   help=precisions.help_text())
    p.add_argument("--output", "-o", type=Path, required=env_default("output") is None, default=env_default("output"),
                   help="directory to write (model.onnx, tokenizer, tritonembed.json, report.json)")
    p.add_argument("--max-length", type=int, default=env_default("max_length", None, int),
                   help="maximum tokens per text (default: the family's, e.g. 8192 for Qwen3, 256 for MiniLM)")
    p.add_argument("--name", default=env_default("name"), help="served model name (default: last part of the id)")
    p.add_argument("--overwrite", action="store_true", default=env_default("overwrite", False, bool),
                   help="replace an existing output directory")
    p.add_argument("--skip-stsb", action="store_true", default=env_default("skip_stsb", False, bool),
                   help="do not measure STS-B Spearman for quantized real-weight models")
    p.add_argument("--int4-activations", choices=INT4_ACTIVATIONS, default=env_default("int4_activations", "float32"),
                   help="int4 only: compute in float32 (CPU) or float16 (GPU: quantizes the fp16 graph; "
                        "docs/benchmarks-gpu.md)")
    p.add_argument("--task", choices=("auto", *TASKS), default=env_default("task", "auto"),
                   help="embed or rerank (docs/rerank.md); auto: rerank when the checkpoint names a reranker")
    add_static_shapes_flag(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from tritonembed.export.pipeline import export_model
    from tritonembed.export.rerank import export_reranker, resolve_task

    if resolve_task(args.model, args.task) == "rerank":
        report = export_reranker(args.model, args.output, precision=args.precision, max_length=args.max_length,
                                 name=args.name, overwrite=args.overwrite, static_shapes=args.static_shapes)
        print(json.dumps({"output": report.output, "passed": report.passed, "validation": report.validation}, indent=2))
        return 0
    report = export_model(args.model, args.output, precision=args.precision, max_length=args.max_length,
                          name=args.name, overwrite=args.overwrite, run_stsb=not args.skip_stsb,
                          int4_activations=args.int4_activations, static_shapes=args.static_shapes)
    print(json.dumps({"output": report.output, "passed": report.passed, "validation": report.validation,
                      "stsb": report.stsb}, indent=2))
    return 0


def _add_tools(sub) -> None:
    p = sub.add_parser("build-qwen-tokenizer", help="build Qwen3-Embedding's tokenizer files offline")
    p.add_argument("output", type=Path, help="directory for tokenizer.json, tokenizer_config.json and special_tokens_map.json")
    p.set_defaults(func=cmd_build_qwen_tokenizer)
    p = sub.add_parser("make-random-qwen3", help="write a random-weight Qwen3-Embedding-shaped checkpoint")
    p.add_argument("output", type=Path, help="directory for the checkpoint (config, safetensors, tokenizer)")
    p.add_argument("--shape", default="tiny", help="tiny, small, 0.6B, 4B or 8B")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.set_defaults(func=cmd_make_random_qwen3)


def cmd_build_qwen_tokenizer(args: argparse.Namespace) -> int:
    from tritonembed.export.qwen_tokenizer import save_qwen3_tokenizer

    print(save_qwen3_tokenizer(args.output))
    return 0


def cmd_make_random_qwen3(args: argparse.Namespace) -> int:
    from tritonembed.export.testmodels import create_random_qwen3

    print(create_random_qwen3(args.output, shape=args.shape, seed=args.seed))
    return 0


def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="list or prune the exports `tritonembed serve` cached")
    p.add_argument("action", choices=("list", "prune"),
                   help="list: every cached export and its status; prune: remove the stale (older exporter "
                        "revision), incomplete and leftover ones")
    p.add_argument("--dry-run", action="store_true", help="prune: say what would be removed, remove nothing")
    p.set_defaults(func=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> int:
    from tritonembed.cache import cache_dir
    from tritonembed.export_cache import prune, scan

    exports = cache_dir() / "exports"
    failed = []
    if args.action == "list":
        entries = scan(exports)
    else:
        entries, failed = prune(exports, dry_run=args.dry_run)
    verb = {"list": "", "prune": "would remove " if args.dry_run else "removed "}[args.action]
    for e in entries:
        revision = "?" if e.revision is None else ("<=3" if e.revision == 3 and e.status == "stale" else str(e.revision))
        print(f"{verb}{e.status:11s} rev {revision:3s} {e.size_bytes / 1e9:7.2f} GB  {e.precision:5s} {e.model_id}  {e.path}")
    for e, reason in failed:
        print(f"not removed {e.path}: {reason}")
    total = sum(e.size_bytes for e in entries)
    where = f" in {exports}" if args.action == "list" else ""
    print(f"{len(entries)} export(s), {total / 1e9:.2f} GB{where} (files hard-linked elsewhere are counted here too)")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tritonembed", description=DESCRIPTION)
    parser.add_argument("--log-level", default=env_default("log_level", "INFO"),
                        choices=("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"), type=str.upper,
                        help="log level of the command (and of the gateway it starts)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_export(sub)
    _add_tools(sub)
    _add_cache(sub)
    launcher_cli.register(sub)
    embed_cli.register(sub)
    bench_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # `tritonembed gateway` has its own --log-level (default None: the environment's), which overwrites this one.
    level = (args.log_level or env_default("log_level", "INFO")).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except TritonEmbedError as exc:
        print(f"error: {exc}", file=sys.stderr)  # once, whatever the log level
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
