# Triton (NGC) with what the Python-backend tokenizer model needs: tokenizers, numpy<2 and the pure-Python
# tritonembed core (spec + model code). The encoder runs on Triton's own onnxruntime backend (GPU profile), or
# on the onnxruntime package inside the Python backend (CPU profile: deploy/k8s/overlays/cpu).
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}
COPY pyproject.toml README.md /src/
COPY tritonembed /src/tritonembed
COPY export /src/export
COPY client /src/client
COPY gateway /src/gateway
COPY model_repository /src/model_repository
COPY benchmarks /src/benchmarks
RUN pip install --no-cache-dir "numpy<2" "tokenizers>=0.20" "onnxruntime>=1.20" && pip install --no-cache-dir --no-deps /src
