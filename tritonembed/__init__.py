"""tritonembed: serve sentence-embedding models on NVIDIA Triton Inference Server.

Sub-packages (installed from the repository's top-level folders):

- ``tritonembed.export``: Hugging Face checkpoint -> validated ONNX encoder (offline; imports torch).
- ``tritonembed.model_repository``: the Triton models and the repository generator (tokenizers, numpy, onnxruntime).
- ``tritonembed.client``: gRPC/HTTP client with Matryoshka slicing (tritonclient, numpy; never torch).
- ``tritonembed.gateway``: the OpenAI-compatible ``/v1/embeddings`` HTTP gateway (depends on the client only).
"""

__version__ = "0.1.0"
