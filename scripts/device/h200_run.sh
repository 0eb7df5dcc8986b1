#!/bin/bash
# The H200 run of docs/benchmarks-gpu.md, as it ran on this workplace's GPU machine (copied to .gpu/run.sh,
# which travels with the checkout; the GPU machine has python3 with torch 2.11/transformers/onnx/nvidia-ml-py
# but no onnxruntime-gpu and no network). The git-ignored .gpu folder was prepared here:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 onnxruntime-gpu==1.31.1
#   unzip the wheel; python scripts/device/prune_fatbin.py .../capi/libonnxruntime_providers_cuda.so cuda90.so --keep 90
#   xz -9 cuda90.so -> .gpu/cuda90.so.xz; xz -9 the pybind .so -> .gpu/pyb.xz; the rest of the wheel -> .gpu/ortpy.tar.xz
#   python -m tritonembed.benchmarks.gpu workload --export-dir <a random-qwen3 export> -o .gpu/workload.json
# On a normal GPU box none of this is needed: pip install onnxruntime-gpu nvidia-ml-py, then the commands below.
# Phases: all (0.6B prepare + measure while 4B prepares in the background, then 4B) | fp16 (0.6B fp16 variants)
#   | remaining (what the first GPU session could not measure: 0.6B fp16 with and without the exporter's
#     static shapes, and w8-fp16, then the 4B fp16, int4-fp16 and w8-fp16 rows; every variant was loaded
#     and run on onnxruntime 1.31.1's CPU provider first, on the tiny shape, so a converter/loader mismatch
#     shows here, not on device time)
#   | ab (the 0.6B fp16 graph with and without the exporter's static shapes, nothing else running, each
#     ordering twice: the 2026-11-26 second-session call measured static shapes slower for small batches,
#     but with the 4B export running beside it)
set -u
PHASE=${1:-all}
R=$PWD
S=/tmp/site
W=/tmp/gbwork  # not in the checkout: the device tool re-syncs it between calls and removed .gbwork
T0=$(date +%s)
el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
if [ ! -f $S/onnxruntime/capi/libonnxruntime_providers_cuda.so ]; then
  mkdir -p $S
  python3 - <<'PY'
import lzma, shutil, tarfile
S = "/tmp/site"
with lzma.open(".gpu/ortpy.tar.xz") as f:
    tarfile.open(fileobj=f, mode="r|").extractall(S)
for src, dst in ((".gpu/cuda90.so.xz", "libonnxruntime_providers_cuda.so"),
                 (".gpu/pyb.xz", "onnxruntime_pybind11_state.cpython-312-x86_64-linux-gnu.so")):
    with lzma.open(src) as f, open(f"{S}/onnxruntime/capi/{dst}", "wb") as out:
        shutil.copyfileobj(f, out, 16 << 20)
PY
  chmod +x $S/onnxruntime/capi/*.so
fi
rm -rf /tmp/te && mkdir -p /tmp/te/tritonembed && cp tritonembed/*.py /tmp/te/tritonembed/
for d in export client gateway model_repository benchmarks; do ln -s $R/$d /tmp/te/tritonembed/$d; done
export PYTHONPATH=/tmp/te:$S PYTHONUNBUFFERED=1
SP=$(python3 -c "import site; print(site.getsitepackages()[0])")
export LD_LIBRARY_PATH=$(find $SP/nvidia -maxdepth 3 -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
cd /tmp/te  # the checkout's own tritonembed/ folder (no subpackages) must not shadow /tmp/te
el "setup done"
if [ "$PHASE" = all ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nproc; free -g | head -2; df -h /tmp $PWD | tail -2
  python3 - <<'EOF' || { echo PREFLIGHT FAILED; ls $SP/nvidia; exit 3; }
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto
print("ort", ort.__version__, ort.get_available_providers())
a = np.random.rand(256, 256).astype(np.float32)
g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 256])],
    [helper.make_tensor("w", TensorProto.FLOAT, [256, 256], a.flatten())])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); m.ir_version = 8
s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"])
x = np.random.rand(8, 256).astype(np.float32)
y = s.run(None, {"x": x})[0]
print("preflight", s.get_providers(), "max err", float(abs(y - x @ a).max()))
assert s.get_providers()[0] == "CUDAExecutionProvider"
EOF
  el "preflight ok"
  mkdir -p $W
  setsid nohup taskset -c 6-15 python3 -m tritonembed.benchmarks.gpu prepare --shapes 4B \
    --precisions fp32,int4,fp16,int4-fp16 --workdir $W --workload $R/.gpu/workload.json > $W/prepare-4B.log 2>&1 < /dev/null &
  taskset -c 0-5 timeout 430 python3 -m tritonembed.benchmarks.gpu run --shapes 0.6B \
    --precisions fp32,fp16,int4-fp16,w8-fp16,int4 --workdir $W --workload $R/.gpu/workload.json \
    --max-tokens 4096,16384,65536 --seconds 2 -o $OUT/gpu-0.6B.json 2>&1 | grep -v "^INFO\|quantize" | tail -40
  el "0.6B done"
  free -g | head -2; tail -5 $W/prepare-4B.log; ls $W/4B
fi
if [ "$PHASE" = remaining ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  mkdir -p $W
  setsid nohup taskset -c 6-15 python3 -m tritonembed.benchmarks.gpu prepare --shapes 4B \
    --precisions fp16,int4-fp16,w8-fp16 --workdir $W --workload $R/.gpu/workload.json > $W/prepare-4B.log 2>&1 < /dev/null &
  taskset -c 0-5 timeout 270 python3 -m tritonembed.benchmarks.gpu run --shapes 0.6B \
    --precisions fp16,fp16-traced,w8-fp16 --workdir $W --workload $R/.gpu/workload.json \
    --max-tokens 4096,16384,65536 --seconds 2 -o $OUT/gpu-0.6B-w8.json 2>&1 | grep -v "^INFO\|quantize" | tail -20
  el "0.6B done"
  LEFT=$(( 560 - ($(date +%s) - T0) ))
  el "4B measure, ${LEFT}s left"
  taskset -c 0-5 timeout $LEFT python3 -m tritonembed.benchmarks.gpu run --no-prepare --shapes 4B \
    --precisions fp16,int4-fp16,w8-fp16 --workdir $W --workload $R/.gpu/workload.json --prepare-timeout $LEFT \
    --max-tokens 4096,16384,65536 --seconds 2 -o $OUT/gpu-4B-fp16.json 2>&1 | grep -v "^INFO" | tail -20
  tail -8 $W/prepare-4B.log
fi
if [ "$PHASE" = ab ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  mkdir -p $W
  taskset -c 0-5 timeout 200 python3 -m tritonembed.benchmarks.gpu prepare --shapes 0.6B \
    --precisions fp16,fp16-traced --workdir $W --workload $R/.gpu/workload.json 2>&1 | grep -v "^INFO\|quantize" | tail -5
  el "prepared"
  for ORDER in fp16,fp16-traced fp16-traced,fp16 fp16,fp16-traced fp16-traced,fp16; do
    taskset -c 0-5 timeout 90 python3 -m tritonembed.benchmarks.gpu run --no-prepare --shapes 0.6B --precisions $ORDER \
      --workdir $W --workload $R/.gpu/workload.json --max-tokens 16384 --seconds 1.5 --prepare-timeout 5 \
      -o $OUT/ab-$(date +%s).json 2>&1 | grep "0.6B fp16" | tail -2
  done
  el "ab done"
fi
if [ "$PHASE" = fp16 ]; then
  mkdir -p $W
  taskset -c 0-5 timeout 175 python3 -m tritonembed.benchmarks.gpu run --shapes 0.6B \
    --precisions fp16,int4-fp16 --workdir $W --workload $R/.gpu/workload.json \
    --max-tokens 4096,16384 --seconds 1.5 -o $OUT/gpu-0.6B-fp16.json 2>&1 | grep -v "^INFO\|quantize" | tail -20
fi
if [ "$PHASE" = all ] || [ "$PHASE" = 4b-measure ]; then
  LEFT=$(( 560 - ($(date +%s) - T0) ))
  el "4B measure, ${LEFT}s left"
  taskset -c 0-5 timeout $LEFT python3 -m tritonembed.benchmarks.gpu run --no-prepare --shapes 4B \
    --precisions fp32,int4,fp16,int4-fp16 --workdir $W --workload $R/.gpu/workload.json --prepare-timeout $LEFT \
    --max-tokens 4096,16384,65536 --seconds 2 -o $OUT/gpu-4B.json 2>&1 | grep -v "^INFO" | tail -20
  tail -8 $W/prepare-4B.log
fi
cp $W/prepare-4B.log $OUT/ 2>/dev/null
el "end"
