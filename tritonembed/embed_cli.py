"""``tritonembed embed``: embed a corpus (JSONL or Parquet) into a folder of Parquet parts, resumably.

The job itself lives in :mod:`tritonembed.client.bulk` (local engine) and :mod:`tritonembed.client.bulk_ray`
(Ray Data); this module only declares the command line. pyarrow, tqdm and ray are imported when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tritonembed.cli_options import env_default


def register(sub) -> None:
    """Add ``embed`` to the ``tritonembed`` sub-commands."""
    p = sub.add_parser("embed", help="embed a JSONL or Parquet corpus into Parquet parts (resumable, many Tritons)",
                       description="Embed every row of INPUT with the model served at --url and write OUT, a "
                                   "folder of Parquet parts (columns id, embedding). Rerun the same command after "
                                   "a crash to continue: rows already written are not embedded again. "
                                   "docs/scale-out.md, 'Bulk embedding jobs'.")
    p.add_argument("input", type=Path,
                   help="a .jsonl (one JSON object per line) or .parquet file; --engine ray also takes a folder of them")
    p.add_argument("--output", "-o", type=Path, required=env_default("output") is None, default=env_default("output"),
                   help="output folder (created; a rerun continues what it holds)")
    p.add_argument("--url", required=env_default("url") is None, default=env_default("url"),
                   help="Triton gRPC (or http://) address(es), comma-separated: host:8001,other:8001")
    p.add_argument("--model", default=env_default("model"),
                   help="served model name (default: the only tritonembed model the servers serve)")
    p.add_argument("--text-field", default=env_default("text_field", "text"), help="field / column holding the text")
    p.add_argument("--id-field", default=env_default("id_field", "id"),
                   help="field / column holding the row's id (strings or integers; written as is)")
    p.add_argument("--batch-size", type=int, default=env_default("batch_size", 64, int),
                   help="texts per request (the client splits above the model's max_batch_size)")
    p.add_argument("--dimensions", type=int, default=env_default("dimensions", None, int),
                   help="Matryoshka size of the vectors (default: the model's hidden size)")
    p.add_argument("--input-type", choices=("query", "document"), default=env_default("input_type"),
                   help="embed the texts as queries or documents (default: documents)")
    p.add_argument("--engine", choices=("local", "ray"), default=env_default("engine", "local"),
                   help="local: this process, resumable per part; ray: Ray Data, resumable per input file")
    p.add_argument("--part-rows", type=int, default=env_default("part_rows", 8192, int),
                   help="local engine: rows per output part (the unit of resumption)")
    p.add_argument("--in-flight", type=int, default=env_default("in_flight", 2, int),
                   help="batches in flight per URL (ray: actors per URL)")
    p.add_argument("--deadline", type=float, default=env_default("deadline", 120.0, float),
                   help="fail (resumably) when every URL is down and none answered for this many seconds")
    p.add_argument("--timeout", type=float, default=env_default("timeout", 60.0, float),
                   help="seconds per request before the batch is retried on another URL")
    p.add_argument("--protocol", choices=("grpc", "http"), default=env_default("protocol"),
                   help="protocol for URLs without a scheme (default: grpc)")
    p.add_argument("--no-progress", action="store_true", default=env_default("no_progress", False, bool),
                   help="no progress bar on stderr (the summary line still comes)")
    p.add_argument("--ray-address", default=env_default("ray_address"),
                   help="ray engine: a running Ray cluster (default: RAY_ADDRESS, else a local one)")
    p.set_defaults(func=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> int:
    """Run the job and print its summary line.

    Raises:
        tritonembed.client.bulk.BulkError: the job could not start or continue (the CLI prints it, exit 2).
    """
    from tritonembed.client.bulk import BulkJob, run_local_job

    job = BulkJob(input=args.input, output=args.output, urls=args.url.split(","), model=args.model,
                  text_field=args.text_field, id_field=args.id_field, batch_size=args.batch_size,
                  dimensions=args.dimensions, input_type=args.input_type, part_rows=args.part_rows,
                  in_flight_per_url=args.in_flight, deadline=args.deadline, timeout=args.timeout,
                  protocol=args.protocol, progress=not args.no_progress)
    if args.engine == "ray":
        from tritonembed.client.bulk_ray import run_ray_job

        report = run_ray_job(job, address=args.ray_address)
    else:
        report = run_local_job(job)
    print(report.summary())
    return 0
