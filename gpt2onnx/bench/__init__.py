"""``python -m gpt2onnx.bench``: cached vs uncached, gpt2onnx vs PyTorch and optimum, against
the weight-streaming floor of this machine.

Every variant runs in its own worker process (``worker.py``) so that thread pools, memory
and imports never mix; the parent (``measurements.py``) interleaves the variants so that
machine noise hits all of them alike. Modules here import only the standard library at
the top: the optimum worker runs in another virtual environment.
"""
