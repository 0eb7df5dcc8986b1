"""``tritonembed serve`` and ``tritonembed repo``: export on first use, assemble, run Triton (+ gateway)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from tritonembed import precisions
from tritonembed.cache import cache_dir
from tritonembed.cli_options import DEFAULT_MODEL, add_static_shapes_flag, env_default
from tritonembed.errors import LaunchError
from tritonembed.export_cache import ensure_export
from tritonembed.model_repository.configs import GPU_BACKENDS, SPINNING_MODES, ServingOptions
from tritonembed.spec import TASKS

log = logging.getLogger("tritonembed.serve")


def _serving_options(args: argparse.Namespace):
    """Raises: ValueError for a bad option value (e.g. --gpu-memory); LaunchError for --tensorrt without
    --gpu-backend onnxruntime."""
    guard = {"memory_threshold": args.memory_threshold, "memory_limit_file": args.memory_limit_file or ""}
    if args.profile == "gpu":
        if args.tensorrt and args.gpu_backend != "onnxruntime":
            raise LaunchError("--tensorrt applies to Triton's onnxruntime backend: add --gpu-backend onnxruntime")
        return ServingOptions(profile="gpu", max_texts_per_request=64, tokenizer_max_batch=256, encoder_max_batch=64,
                              encoder_instances=args.instances, tensorrt=args.tensorrt,
                              max_queue_size=args.max_queue_size, gpu_backend=args.gpu_backend,
                              memory_grant=args.gpu_memory or "", **guard)
    return ServingOptions(profile="cpu", encoder_instances=args.instances, max_queue_size=args.max_queue_size,
                          intra_op_threads=args.threads or max(1, (os.cpu_count() or 1) // args.instances),
                          intra_op_spinning=args.spinning, max_tokens_per_batch=args.max_tokens_per_batch,
                          microbatch_workers=args.microbatch_workers, **guard)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", default=None,
                   help=f"model ids, local checkpoints or exported directories (default: {DEFAULT_MODEL})")
    p.add_argument("--precision", choices=precisions.NAMES, default=env_default("precision", "fp32"),
                   help="precision of models exported on first use: " + precisions.help_text())
    p.add_argument("--profile", choices=("cpu", "gpu"), default=env_default("profile", "cpu"))
    p.add_argument("--max-length", type=int, default=env_default("max_length", None, int))
    p.add_argument("--name", default=env_default("name"), help="served name (only with one model)")
    p.add_argument("--task", choices=("auto", *TASKS), default=env_default("task", "auto"),
                   help="embed or rerank, for checkpoints exported on first use (auto: rerank when it names a reranker)")
    p.add_argument("--instances", type=int, default=env_default("instances", 1, int), help="encoder instances")
    p.add_argument("--threads", type=int, default=env_default("threads", 0, int), help="ONNX Runtime threads per CPU instance")
    p.add_argument("--spinning", choices=SPINNING_MODES, default=env_default("spinning", ServingOptions.intra_op_spinning),
                   help="CPU profile: when ONNX Runtime's threads busy-wait for work (default during_run: not after "
                        "a run returns, so they leave the cores to the tokenizer and Triton)")
    p.add_argument("--max-tokens-per-batch", type=int,
                   default=env_default("max_tokens_per_batch", ServingOptions.max_tokens_per_batch, int),
                   help="CPU profile: padded tokens per ONNX Runtime run of the encoder's micro-batches (default "
                        f"{ServingOptions.max_tokens_per_batch}: small enough for the activations to stay in cache)")
    p.add_argument("--microbatch-workers", type=int,
                   default=env_default("microbatch_workers", ServingOptions.microbatch_workers, int),
                   help="CPU profile: run an execute's micro-batches this many at a time, one thread each, on a "
                        f"second session (default {ServingOptions.microbatch_workers}; 1 = off; models over 256 MB "
                        "and single-threaded encoders always run one at a time)")
    p.add_argument("--tensorrt", action="store_true", default=env_default("tensorrt", False, bool),
                   help="GPU profile with --gpu-backend onnxruntime: use the TensorRT execution accelerator")
    p.add_argument("--gpu-backend", choices=GPU_BACKENDS, default=env_default("gpu_backend", ServingOptions.gpu_backend),
                   help="GPU profile: python = our encoder on onnxruntime-gpu (token budget, memory guard, NaN "
                        "check); onnxruntime = Triton's backend (NGC tritonserver), bounded only by its batch size")
    p.add_argument("--gpu-memory", default=env_default("gpu_memory", ""),
                   help="GPU profile: memory the encoder may use, in GiB (e.g. 20), as a size (e.g. 512M) or as a "
                        "fraction of the device (e.g. 0.8) (default: what is free at start minus 1 GiB)")
    p.add_argument("--memory-threshold", type=float,
                   default=env_default("memory_threshold", ServingOptions.memory_threshold, float),
                   help="shed new work with a retryable error (503 at the gateway) above this fraction of the "
                        "encoder's memory limit")
    p.add_argument("--memory-limit-file", default=env_default("memory_limit_file", ""),
                   help="a file whose content (bytes, or e.g. 4G) lowers the memory guard's limit at runtime; "
                        "empty or absent = the device / cgroup / host limit")
    p.add_argument("--max-queue-size", type=int, default=env_default("max_queue_size", 0, int),
                   help="bound each Triton model's queue; overflow gets UNAVAILABLE (default 0: unbounded, "
                        "because Triton 2.51's batcher stalls up to 500 ms with a queue policy; see docs/serving.md)")
    add_static_shapes_flag(p)


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve models on tritonserver (+ the OpenAI-compatible gateway)")
    _add_common(p)
    p.add_argument("--repository", type=Path, default=env_default("repository", None, Path),
                   help="where to assemble the Triton model repository (default: in the cache)")
    p.add_argument("--http-port", type=int, default=env_default("http_port", 8000, int))
    p.add_argument("--grpc-port", type=int, default=env_default("grpc_port", 8001, int))
    p.add_argument("--metrics-port", type=int, default=env_default("metrics_port", 8002, int))
    p.add_argument("--host", default=env_default("host", "127.0.0.1"),
                   help="interface Triton listens on (0.0.0.0 to expose it)")
    p.add_argument("--gateway-port", type=int, default=env_default("gateway_port", 8080, int))
    p.add_argument("--gateway-host", default=env_default("gateway_host", "127.0.0.1"))
    p.add_argument("--no-gateway", action="store_true", default=env_default("no_gateway", False, bool))
    from tritonembed.gateway.cli import add_token_ids_flag

    add_token_ids_flag(p)
    p.add_argument("--startup-timeout", type=float, default=env_default("startup_timeout", 300.0, float))
    p.add_argument("--max-restarts", type=int, default=env_default("max_restarts", 5, int),
                   help="restart a dead tritonserver at most this many times per --restart-window, then exit "
                        "non-zero (default 5; 0 = never restart)")
    p.add_argument("--restart-window", type=float, default=env_default("restart_window", 60.0, float),
                   help="seconds over which --max-restarts counts (default 60)")
    p.add_argument("--restart-backoff", type=float, default=env_default("restart_backoff", 1.0, float),
                   help="seconds before the first restart; doubles per restart within the window, at most 30 "
                        "(default 1)")
    p.add_argument("--keep-logs", type=int, default=env_default("keep_logs", 5, int),
                   help="logs of earlier tritonserver starts kept beside the current one as .1 ... .N (default 5)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("gateway", help="run only the OpenAI-compatible gateway in front of a running Triton")
    from tritonembed.gateway.cli import build_parser as gateway_parser

    gateway_parser(p)
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("repo", help="assemble a Triton model repository (e.g. the GPU profile for docker-compose)")
    _add_common(p)
    p.add_argument("--output", "-o", type=Path, required=True)
    p.set_defaults(func=cmd_repo)


def cmd_gateway(args: argparse.Namespace) -> int:
    from tritonembed.gateway.cli import settings_from_args
    from tritonembed.gateway.server import run_gateway

    run_gateway(settings_from_args(args))
    return 0


def _exports(args: argparse.Namespace) -> list[Path]:
    models = args.models or [DEFAULT_MODEL]
    if args.name and len(models) > 1:
        raise LaunchError("--name applies to a single model")
    activations = "float16" if args.profile == "gpu" else "float32"  # int4 on a GPU computes in fp16
    return [ensure_export(m, args.precision, args.max_length, args.name, activations, args.static_shapes,
                          task=getattr(args, "task", "auto")) for m in models]


def cmd_repo(args: argparse.Namespace) -> int:
    from tritonembed.model_repository.assemble import build_repository

    specs = build_repository(args.output, _exports(args), _serving_options(args))
    for spec in specs:
        print(f"{spec.name}: {spec.precision}, {args.profile} profile -> {args.output}")
    return 0


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Stop(signal.Signals(signum).name)


def _check_gpu_encoder(gpu_backend: str) -> None:
    """Raises: LaunchError when this environment cannot run the gpu profile's encoder."""
    if gpu_backend == "onnxruntime":
        if not os.environ.get("TRITONEMBED_TRITONSERVER"):
            raise LaunchError("--gpu-backend onnxruntime needs Triton's onnxruntime backend (the NGC tritonserver "
                              "container): use docker-compose, or set TRITONEMBED_TRITONSERVER to that binary")
        return
    try:  # the Python-backend encoder runs in this environment's onnxruntime (the pip tritonserver is a CUDA build)
        import onnxruntime
    except ImportError as exc:
        raise LaunchError("the gpu profile's encoder needs onnxruntime-gpu: pip install onnxruntime-gpu") from exc
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise LaunchError("the gpu profile's encoder needs onnxruntime-gpu (this onnxruntime has "
                          f"{', '.join(onnxruntime.get_available_providers())}): pip uninstall onnxruntime && "
                          "pip install onnxruntime-gpu")


def cmd_serve(args: argparse.Namespace) -> int:
    """Export if needed, assemble, run tritonserver under a :class:`~tritonembed.supervisor.Supervisor` (+ gateway).

    Returns 0 after SIGTERM / SIGINT.

    Raises:
        LaunchError: a taken port, a first start that fails, or (SupervisorGaveUp) a server that kept dying.
    """
    from tritonembed.launcher import TritonServer, ensure_port_free
    from tritonembed.model_repository.assemble import build_repository
    from tritonembed.supervisor import RestartPolicy, Supervisor

    try:
        policy = RestartPolicy(args.max_restarts, args.restart_window, args.restart_backoff,
                               max(30.0, args.restart_backoff))
    except ValueError as exc:
        raise LaunchError(f"{exc} (--max-restarts, --restart-window, --restart-backoff)") from exc
    if args.profile == "gpu":
        _check_gpu_encoder(args.gpu_backend)
    # Fail fast on taken ports, before a possibly long export.
    for port, what in ((args.http_port, "http"), (args.grpc_port, "grpc"), (args.metrics_port, "metrics")):
        ensure_port_free(port, what)
    if not args.no_gateway:
        ensure_port_free(args.gateway_port, "gateway")
    exports = _exports(args)
    repository = args.repository or (cache_dir() / "repositories" / f"serve-{args.http_port}")
    specs = build_repository(repository, exports, _serving_options(args))
    server = TritonServer(repository, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, startup_timeout=args.startup_timeout,
                          log_file=repository.parent / f"tritonserver-{args.http_port}.log", gpu=args.profile == "gpu",
                          host=args.host, keep_logs=args.keep_logs)
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    gateway = None
    try:
        server.start()
        if not args.no_gateway:
            from tritonembed.gateway.server import BackgroundGateway
            from tritonembed.gateway.settings import GatewaySettings

            settings = GatewaySettings.from_env(triton_url=server.grpc_url, port=args.gateway_port,
                                                host=args.gateway_host, model_dirs=tuple(exports),
                                                token_ids=args.token_ids)
            gateway = BackgroundGateway(settings).start()
            try:
                gateway.wait_ready(args.startup_timeout)  # /ready: Triton reachable, models ready (with a key if set)
            except RuntimeError as exc:
                raise LaunchError(str(exc)) from exc
        _announce(specs, server, gateway)
        # The gateway keeps running across restarts (it answers 503 while Triton is down).
        Supervisor(server, policy).run()
    except _Stop as stop:
        log.info("%s received: shutting down", stop)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if gateway is not None:
            gateway.stop()
        server.stop()


def _announce(specs, server, gateway) -> None:
    lines = ["", "tritonembed is serving:"]
    for spec in specs:
        low, high = spec.dimension_range
        lines.append(f"  {spec.name} ({spec.model_id}, {spec.precision}, {spec.hidden_size} dims, "
                     f"dimensions {low}..{high}, max {spec.max_length} tokens)")
    lines += [f"  Triton gRPC     {server.grpc_url}", f"  Triton HTTP     http://{server.http_url}/v2/models/{specs[0].name}/infer",
              f"  Triton metrics  {server.metrics_url}"]
    if gateway is not None:
        lines.append(f"  OpenAI API      {gateway.url}/v1/embeddings   (openai.Client(base_url='{gateway.url}/v1'))")
    lines.append("Press Ctrl-C to stop.")
    print("\n".join(lines), flush=True)
