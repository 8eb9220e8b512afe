"""The OpenAI-compatible server as Ray Serve replicas (the ``[ray]`` extra).

    python -m gpt2onnx.serve.ray MODEL_DIR --replicas 2 --port 8000
    serve run deploy/ray-serve.yaml

Each replica owns one engine; the routes, validation and errors are the single-machine
server's (``gpt2onnx.serve.create_app``). Only ``gpt2onnx.serve.ray.deployment`` imports
Ray: this package's configs, and the rest of gpt2onnx, import without it.
"""

from gpt2onnx.serve.ray.config import ReplicaConfig, ScalingConfig, configs_from_args

__all__ = ["ReplicaConfig", "ScalingConfig", "configs_from_args"]
