"""Run an exported model folder with onnxruntime, numpy and tokenizers only.

    from gpt2onnx.runtime import Model
    model = Model("models/pydoc-tiny-onnx")
    print(model.generate("Return the", max_new_tokens=20).text)
    for piece in model.stream("Return the", max_new_tokens=20):
        print(piece, end="", flush=True)
"""

from gpt2onnx.errors import (
    Gpt2OnnxError,
    InvalidParameterError,
    ModelFolderError,
    PromptTooLongError,
    ProviderUnavailableError,
)
from gpt2onnx.runtime.generator import Generator
from gpt2onnx.runtime.model import GenerationResult, Model
from gpt2onnx.runtime.params import GenerationParams
from gpt2onnx.runtime.prefix_cache import PrefixCache
from gpt2onnx.runtime.scoring import ScoreResult

__all__ = [
    "GenerationParams",
    "GenerationResult",
    "Generator",
    "Gpt2OnnxError",
    "InvalidParameterError",
    "Model",
    "ModelFolderError",
    "PrefixCache",
    "PromptTooLongError",
    "ProviderUnavailableError",
    "ScoreResult",
]
