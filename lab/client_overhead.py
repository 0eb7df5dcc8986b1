"""Where a Python caller's single-text latency goes: one server, the same short texts, six clients.

Starts the CPU server on one export and times one short text at a time, in alternated rounds, through:
perf_analyzer (C++ gRPC, requests prepared up front), a bare grpc-python stub sending a request built up
front (the floor for any Python gRPC client), tritonclient's gRPC and HTTP clients with inputs built up front,
and :class:`~tritonembed.client.EmbeddingClient` over gRPC and HTTP (all the work of a real call: request
planning, tensors, output parsing, re-normalization). The differences between legs are what each layer
costs; ``tritonembed bench`` reports only perf_analyzer and the gRPC ``EmbeddingClient``.

    python -m lab.client_overhead EXPORT_DIR [--rounds 5] [--texts 16] [-o out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("lab.client_overhead")

#: Legs in the order of the first round (later rounds rotate it).
LEGS = ("perf_analyzer", "grpc_stub", "tritonclient_grpc", "tritonclient_http", "ours_grpc", "ours_http")


def python_legs(grpc_url: str, http_url: str, model: str, texts: Sequence[str],
                closing: contextlib.ExitStack) -> dict[str, Callable[[int], Any]]:
    """One callable per Python leg: ``leg(i)`` sends ``texts[i]`` and waits for the embedding.

    The legs' clients and channel are closed by ``closing``.
    """
    import grpc
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from tritonembed.client import EmbeddingClient, _transport
    from tritonembed.client.core import plan_embed
    from tritonembed.spec import EMBEDDING_OUTPUT_NAME, TOKEN_COUNT

    ours_grpc = closing.enter_context(EmbeddingClient(grpc_url, model=model))
    ours_http = closing.enter_context(EmbeddingClient(f"http://{http_url}", model=model))
    info = ours_grpc.model_info()
    tensors = [plan_embed(info, [text], dimensions=None, input_type=None, instruction=None, normalize=True,
                          truncate=True, force_dimensions=False, batch_size=1).chunk_inputs(0) for text in texts]
    grpc_inputs = [_transport.infer_inputs(tgrpc, t) for t in tensors]
    http_inputs = [_transport.infer_inputs(thttp, t) for t in tensors]
    requests = []
    for row, inputs in zip(tensors, grpc_inputs, strict=True):
        request = service_pb2.ModelInferRequest(model_name=model)
        for tensor, infer_input in zip(row, inputs, strict=True):
            request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.data.shape))
            request.raw_input_contents.append(infer_input._raw_content)  # tritonclient's serialized bytes
        for output in (EMBEDDING_OUTPUT_NAME, TOKEN_COUNT.name):  # what the other legs ask for
            request.outputs.add(name=output)
        requests.append(request)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(closing.enter_context(grpc.insecure_channel(grpc_url)))
    tc_grpc = tgrpc.InferenceServerClient(grpc_url)
    closing.callback(tc_grpc.close)
    tc_http = thttp.InferenceServerClient(http_url)
    closing.callback(tc_http.close)
    grpc_outputs = _transport.requested_outputs(tgrpc)
    http_outputs = _transport.requested_outputs(thttp)
    return {
        "grpc_stub": lambda i: stub.ModelInfer(requests[i]),
        "tritonclient_grpc": lambda i: tc_grpc.infer(model, grpc_inputs[i], outputs=grpc_outputs).as_numpy(EMBEDDING_OUTPUT_NAME),
        "tritonclient_http": lambda i: tc_http.infer(model, http_inputs[i], outputs=http_outputs).as_numpy(EMBEDDING_OUTPUT_NAME),
        "ours_grpc": lambda i: ours_grpc.embed([texts[i]]),
        "ours_http": lambda i: ours_http.embed([texts[i]]),
    }


def p50_ms(leg: Callable[[int], Any], count: int, samples: int) -> float:
    """Median latency of ``samples`` calls cycling over ``count`` texts."""
    latencies = []
    for k in range(samples):
        started = time.perf_counter()
        leg(k % count)
        latencies.append((time.perf_counter() - started) * 1e3)
    return statistics.median(latencies)


def measure(export_dir: Path, *, rounds: int, texts: int, samples: int, threads: int, workdir: Path) -> dict[str, Any]:
    """Per-round p50 of every leg and the median over rounds.

    Raises:
        LaunchError: the server does not start. PerfAnalyzerError: perf_analyzer fails.
    """
    from tritonembed.benchmarks.bench import rotated, short_sentences
    from tritonembed.benchmarks.perf_analyzer import run_perf_analyzer
    from tritonembed.launcher import TritonServer
    from tritonembed.model_repository.assemble import build_repository
    from tritonembed.model_repository.configs import ServingOptions

    [spec] = build_repository(workdir / "models", [export_dir], ServingOptions(profile="cpu", intra_op_threads=threads))
    short = short_sentences(texts)
    per_round: list[dict[str, float]] = []
    with TritonServer(workdir / "models", log_file=workdir / "tritonserver.log") as server, contextlib.ExitStack() as closing:
        legs = python_legs(server.grpc_url, server.http_url, spec.name, short, closing)
        for leg in legs.values():  # warm-up: connections, first-call paths
            for i in range(len(short)):
                leg(i)

        def perf_analyzer_p50(k: int) -> float:
            [row] = run_perf_analyzer(spec.name, server.grpc_url, workdir / f"pa-{k}", concurrency="1:1:1",
                                      texts=short, request_count=samples, max_trials=3)
            return row.p50_ms

        for k in range(rounds):
            row = {}
            for name in rotated(list(LEGS), k):
                row[name] = round(perf_analyzer_p50(k) if name == "perf_analyzer"
                                  else p50_ms(legs[name], len(short), samples), 3)
            per_round.append(row)
            log.info("round %d: %s", k + 1, row)
    median = {name: round(statistics.median(r[name] for r in per_round), 3) for name in LEGS}
    return {"export_dir": str(export_dir), "model": spec.name, "texts": texts, "samples_per_leg": samples,
            "rounds": per_round, "median_p50_ms": median,
            "over_perf_analyzer_ms": {name: round(median[name] - median["perf_analyzer"], 3) for name in LEGS}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.client_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--texts", type=int, default=16, help="distinct short texts (STS-B sentences)")
    parser.add_argument("--samples", type=int, default=128, help="calls per leg and round")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of the encoder")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="client-overhead-") as tmp:
        result = measure(args.export_dir, rounds=args.rounds, texts=args.texts, samples=args.samples,
                         threads=args.threads, workdir=args.workdir or Path(tmp))
    text = json.dumps(result, indent=1)
    if args.output:
        args.output.write_text(text + "\n")
    print(json.dumps({"median_p50_ms": result["median_p50_ms"], "over_perf_analyzer_ms": result["over_perf_analyzer_ms"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
