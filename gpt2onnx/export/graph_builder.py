"""A thin layer over ``onnx.helper``: unique names, initializers, one call per node.

Both layouts are written with it so that a graph reads like the model's forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gpt2onnx.contract import TensorSpec

_ELEM = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "bool": TensorProto.BOOL,
}

MS_DOMAIN = "com.microsoft"


def elem_type(dtype: str) -> int:
    return _ELEM[dtype]


class GraphBuilder:
    """Collects nodes, initializers and IO, then makes an ``onnx.ModelProto``."""

    def __init__(self, name: str, opset: int, contrib: bool = False) -> None:
        self.name = name
        self.opset = opset
        self.contrib = contrib
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._counts: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}

    def _fresh(self, hint: str) -> str:
        n = self._counts.get(hint, 0)
        self._counts[hint] = n + 1
        return hint if n == 0 else f"{hint}_{n}"

    def add_input(self, spec: TensorSpec) -> str:
        self.inputs.append(helper.make_tensor_value_info(spec.name, elem_type(spec.dtype),
                                                         list(spec.shape)))
        return spec.name

    def add_output(self, spec: TensorSpec, source: str) -> None:
        """Expose ``source`` as graph output ``spec.name`` (renaming through Identity if needed)."""
        if source != spec.name:
            self.nodes.append(helper.make_node("Identity", [source], [spec.name],
                                               name=self._fresh(f"out_{spec.name}")))
        self.outputs.append(helper.make_tensor_value_info(spec.name, elem_type(spec.dtype),
                                                          list(spec.shape)))

    def weight(self, name: str, array: np.ndarray) -> str:
        """A named initializer (model weights keep their checkpoint names)."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value: Sequence[int] | Sequence[float] | int | float | np.ndarray,
              dtype: str = "int64") -> str:
        """A small constant, shared between all nodes that ask for the same value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self._fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None,
           n_out: int = 1, domain: str = "", **attrs) -> str:
        outs = self.op_multi(op_type, inputs, hint=hint, n_out=n_out, domain=domain, **attrs)
        return outs[0]

    def op_multi(self, op_type: str, inputs: Sequence[str], hint: str | None = None,
                 n_out: int = 1, domain: str = "", outputs: Sequence[str] | None = None,
                 **attrs) -> list[str]:
        base = self._fresh(hint or op_type.lower())
        outs = list(outputs) if outputs is not None else (
            [base] if n_out == 1 else [f"{base}:{i}" for i in range(n_out)])
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"n_{base}",
                                           domain=domain or None, **attrs))
        return outs

    def model(self, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  initializer=self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        if self.contrib:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="gpt2onnx",
                                  doc_string=doc)
        # IR version 8 is read by every onnxruntime >= 1.14 (and by optimum's tooling).
        model.ir_version = 8 if self.opset <= 18 else 10
        return model
