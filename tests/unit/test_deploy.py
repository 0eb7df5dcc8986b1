"""docker-compose.yml cannot run here (no Docker engine): it is validated statically against the CLI and layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tritonembed.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def expand(value: str) -> str:
    """Docker Compose's ${VAR:-default} with defaults only."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_services_and_images_exist(compose):
    assert set(compose["services"]) == {"export", "triton", "gateway"}
    for name, service in compose["services"].items():
        dockerfile = ROOT / service["build"]["context"] / service["build"]["dockerfile"]
        assert dockerfile.is_file(), name
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"


def test_export_and_gateway_commands_parse_with_our_cli(compose):
    parser = build_parser()
    export_args = parser.parse_args([expand(a) for a in compose["services"]["export"]["command"]])
    assert export_args.command == "repo" and export_args.profile == "gpu"
    assert export_args.models == ["Qwen/Qwen3-Embedding-4B"] and export_args.precision == "fp16"
    # the default GPU encoder: the Python backend with a budget from what is free, guarded at 90 %
    assert export_args.gpu_backend == "python" and export_args.gpu_memory == ""
    assert export_args.memory_threshold == 0.9
    from tritonembed.launcher_cli import _serving_options

    options = _serving_options(export_args)
    assert options.provider == "cuda" and options.memory_grant == ""
    gateway_args = parser.parse_args(compose["services"]["gateway"]["command"])
    assert gateway_args.command == "gateway" and gateway_args.port == 8080
    assert gateway_args.triton_url == "triton:" + str(_triton_flag(compose, "grpc-port"))


def _triton_flag(compose, flag: str) -> str:
    for arg in compose["services"]["triton"]["command"]:
        if arg.startswith(f"--{flag}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"triton command has no --{flag}")


def test_repository_volume_is_shared_between_export_and_triton(compose):
    export_out = compose["services"]["export"]["command"]
    repo_path = export_out[export_out.index("--output") + 1]
    assert _triton_flag(compose, "model-repository") == repo_path
    mounts = {s: [v.split(":")[:2] for v in compose["services"][s]["volumes"]] for s in ("export", "triton")}
    assert ["models", repo_path] in mounts["export"] and ["models", repo_path] in mounts["triton"]
    assert "models" in compose["volumes"]


def test_only_the_gateway_is_published_and_triton_gets_a_gpu(compose):
    triton = compose["services"]["triton"]
    for mapping in triton["ports"]:
        assert mapping.startswith("127.0.0.1:"), f"Triton port {mapping} must stay on loopback"
    assert not any(p.endswith(":" + _triton_flag(compose, "http-port")) for p in triton["ports"])
    [device] = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert compose["services"]["gateway"]["ports"] == ["8080:8080"]
    assert compose["services"]["triton"]["depends_on"]["export"]["condition"] == "service_completed_successfully"


def test_triton_image_installs_what_the_python_backend_encoder_imports():
    dockerfile = (ROOT / "deploy" / "triton.Dockerfile").read_text()
    install = " ".join(line for line in dockerfile.splitlines() if "pip install" in line)
    for package in ("onnxruntime-gpu", "numpy<2", "tokenizers", "nvidia-ml-py"):
        assert package in install, package
    assert "CUDAExecutionProvider" in dockerfile  # the build fails if the CUDA provider does not load
    # what encoder_model.py imports at load time is either installed there or part of the project
    import ast

    tree = ast.parse((ROOT / "model_repository" / "encoder_model.py").read_text())
    top = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
    top |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert top <= {"__future__", "os", "json", "onnxruntime", "tritonembed"}, top
