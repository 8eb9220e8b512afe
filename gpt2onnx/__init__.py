"""gpt2onnx: GPT-2 family checkpoints exported to ONNX, generated with ONNX Runtime.

The package is split in two halves that share files, not imports:
``gpt2onnx.export`` (torch + transformers, writes a model folder) and
``gpt2onnx.runtime`` (onnxruntime + numpy + tokenizers, reads one).
``gpt2onnx.contract`` is the folder format both sides agree on.
"""

__version__ = "0.1.0"
