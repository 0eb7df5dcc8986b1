# Export + gateway image: CPU PyTorch (export runs once, offline-capable), ONNX Runtime for validation,
# and the gateway. Build context: the repository root.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml constraints.txt README.md /src/
COPY tritonembed /src/tritonembed
COPY export /src/export
COPY client /src/client
COPY gateway /src/gateway
COPY model_repository /src/model_repository
COPY benchmarks /src/benchmarks
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-cache-dir -c constraints.txt "/src[export,client,gateway]"
ENTRYPOINT ["tritonembed"]
