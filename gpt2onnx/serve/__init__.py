"""OpenAI-compatible serving with continuous batching (the ``[serve]`` extra).

    python -m gpt2onnx.serve MODEL_DIR --port 8000

Without HTTP, the same engine serves Python callers (sync or asyncio)::

    from gpt2onnx.serve import Engine
    with Engine(lambda: Model(folder, mixed=True)) as engine:
        completion = engine.complete_sync(engine.request("Hello", GenerationParams()))

Imports onnxruntime, numpy, tokenizers, FastAPI and prometheus-client; never torch.
"""

from gpt2onnx.serve.app import create_app
from gpt2onnx.serve.completion import ChoiceDelta, Completion, EngineRequest, RowSpec
from gpt2onnx.serve.engine import Engine, EngineConfig, EngineStats
from gpt2onnx.serve.errors import (
    EngineError,
    ModelRunError,
    NotReadyError,
    QueueFullError,
    RequestTimeoutError,
    ServeError,
    ShuttingDownError,
)
from gpt2onnx.serve.metrics import ServeMetrics

__all__ = [
    "ChoiceDelta",
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineRequest",
    "EngineStats",
    "ModelRunError",
    "NotReadyError",
    "QueueFullError",
    "RequestTimeoutError",
    "RowSpec",
    "ServeError",
    "ServeMetrics",
    "ShuttingDownError",
    "create_app",
]
