# Triton (NGC) with what the Python-backend models need: the tokenizer (tokenizers, numpy<2) and the encoder
# (onnxruntime-gpu on the CUDA execution provider, nvidia-ml-py for the memory guard and the default budget, onnx
# to read the graph's shape for the memory model), plus the pure-Python tritonembed core (spec + model code).
# Triton's own onnxruntime backend is still in the image for `--gpu-backend onnxruntime`.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}
COPY pyproject.toml README.md /src/
COPY tritonembed /src/tritonembed
COPY export /src/export
COPY client /src/client
COPY gateway /src/gateway
COPY model_repository /src/model_repository
COPY benchmarks /src/benchmarks
# onnxruntime-gpu >= 1.19 on PyPI is built for CUDA 12 + cuDNN 9, what the 24.x containers carry.
RUN pip install --no-cache-dir "numpy<2" "tokenizers>=0.20" "onnxruntime-gpu>=1.20" "nvidia-ml-py" "onnx>=1.16" \
 && pip install --no-cache-dir --no-deps /src \
 && python3 -c "import onnxruntime; assert 'CUDAExecutionProvider' in onnxruntime.get_available_providers()"
