"""``tritonembed serve`` / ``repo`` flags reach the generated serving options."""

from __future__ import annotations

import argparse

import pytest

from tritonembed.launcher_cli import _serving_options, register


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_cpu_defaults_spin_only_during_a_run_and_bound_no_queue():
    options = _serving_options(_args())
    assert options.profile == "cpu" and options.intra_op_spinning == "during_run" and options.max_queue_size == 0
    assert options.max_tokens_per_batch == 512 and options.microbatch_workers == 2


def test_flags_are_carried_into_the_options():
    options = _serving_options(_args("--spinning", "never", "--max-queue-size", "32", "--threads", "1",
                                     "--max-tokens-per-batch", "2048", "--microbatch-workers", "1"))
    assert (options.intra_op_spinning, options.max_queue_size, options.intra_op_threads) == ("never", 32, 1)
    assert options.max_tokens_per_batch == 2048 and options.microbatch_workers == 1


def test_a_token_budget_below_one_is_refused():
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        _serving_options(_args("--max-tokens-per-batch", "0"))


def test_no_micro_batch_workers_is_refused():
    with pytest.raises(ValueError, match="microbatch_workers"):
        _serving_options(_args("--microbatch-workers", "0"))


def test_unknown_spinning_mode_is_refused(capsys):
    with pytest.raises(SystemExit):
        _args("--spinning", "sometimes")
    assert "invalid choice" in capsys.readouterr().err


def test_gpu_memory_flags_reach_the_gpu_options_and_bad_values_are_refused():
    options = _serving_options(_args("--profile", "gpu", "--gpu-memory", "20", "--memory-threshold", "0.8",
                                     "--memory-limit-file", "/run/limit"))
    assert (options.gpu_backend, options.memory_grant, options.memory_threshold) == ("python", "20", 0.8)
    assert options.memory_limit_file == "/run/limit" and options.provider == "cuda"
    with pytest.raises(ValueError, match="memory grant"):
        _serving_options(_args("--profile", "gpu", "--gpu-memory", "plenty"))
    from tritonembed.errors import LaunchError

    with pytest.raises(LaunchError, match="--gpu-backend onnxruntime"):
        _serving_options(_args("--profile", "gpu", "--tensorrt"))


def test_the_gpu_encoder_check_names_onnxruntime_gpu_where_cuda_is_missing():
    import onnxruntime

    from tritonembed.errors import LaunchError
    from tritonembed.launcher_cli import _check_gpu_encoder

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        _check_gpu_encoder("python")  # a CUDA build here: the check passes
    else:
        with pytest.raises(LaunchError, match="onnxruntime-gpu"):
            _check_gpu_encoder("python")
