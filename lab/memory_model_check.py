"""How the memory model's estimate compares with the peak RSS one ONNX Runtime CPU run adds above the loaded session.

    python -m lab.memory_model_check EXPORT_DIR ROWS LENGTH

Prints one JSON line: the model's shape, its estimate for a ``ROWS x LENGTH`` micro-batch and the measured peak
(RSS sampled every 0.5 ms during the run, minus the RSS after a warm-up run). CPU only; 2 intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np


def rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * 4096


def main() -> None:
    import onnxruntime as ort

    from tritonembed.model_repository.memory_model import model_shape
    from tritonembed.spec import ModelSpec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("rows", type=int)
    parser.add_argument("length", type=int)
    args = parser.parse_args()
    spec = ModelSpec.load(args.export_dir)
    path = f"{args.export_dir}/{spec.onnx_file}"
    shape = model_shape(path, spec.hidden_size, spec.precision)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(1000, 20000, size=(args.rows, args.length)).astype(np.int64)
    mask = np.ones_like(ids)
    session.run(None, {"input_ids": ids[:, :8], "attention_mask": mask[:, :8]})  # warm-up: arena, kernels
    before = rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    session.run(None, {"input_ids": ids, "attention_mask": mask})
    done.set()
    sampler.join()
    print(json.dumps({"rows": args.rows, "length": args.length, "shape": shape.to_dict(),
                      "estimate_mib": round(shape.activation_bytes(args.rows, args.length) / 2**20, 1),
                      "measured_peak_above_loaded_mib": round((peak[0] - before) / 2**20, 1)}))


if __name__ == "__main__":
    main()
