"""The weight-streaming floor: how fast this machine can read a token's worth of weights.

At batch 1 a decode step multiplies one activation row by every weight matrix once, so
its time cannot drop below the time to stream those weights from memory. We measure that
directly: a graph holding only the model's weight GEMVs ([1, K] x [K, N], one per MatMul
of the fused graph, LM head included), quantized by the same onnxruntime tools as the
export, timed in onnxruntime with the runtime's own session options.
floor_ms = that time; bandwidth = weight bytes / floor_ms.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Floor:
    precision: str
    weight_bytes: int  # initializers the GEMVs read per token (scales included)
    gemv_ms: float  # median over runs
    gemv_ms_runs: list[float]

    @property
    def gb_per_s(self) -> float:
        return self.weight_bytes / self.gemv_ms / 1e6

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gb_per_s": self.gb_per_s}


def gemv_weights(fused_fp32_graph: Path) -> list[np.ndarray]:
    """Every [K, N] matrix a decode step multiplies by, from a fused fp32 graph.

    The tied LM head appears there as Gemm(transB=1) over the [vocab, n_embd] table;
    it is returned transposed, as the quantized graphs hold it.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(fused_fp32_graph))
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        out.append(np.ascontiguousarray(w.T) if trans_b else w)
    return out


def gemv_graph(weights: list[np.ndarray]) -> Any:
    """One input row per distinct K, one MatMul per weight; every product is an output
    so nothing is pruned."""
    from onnx import TensorProto, helper, numpy_helper

    ks = sorted({w.shape[0] for w in weights})
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in ks]
    nodes, inits, outputs = [], [], []
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{w.shape[0]}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT,
                                                     [1, w.shape[1]]))
    graph = helper.make_graph(nodes, "gemv_floor", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weight_bytes(model: Any) -> int:
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def measure_floors(fused_fp32_graph: Path, precisions: list[str], runs: int,
                   threads: int | None = None) -> dict[str, Floor]:
    """Time the GEMV graph of each precision (median of ``runs``), one after another."""
    import onnx
    import onnxruntime as ort

    from gpt2onnx.export.precision import apply_precision
    from gpt2onnx.runtime.folder import session_options

    weights = gemv_weights(fused_fp32_graph)
    floors: dict[str, Floor] = {}
    # One session alive at a time, not interleaved: each session has its own intra-op
    # threads, and with spinning on the threads of an idle session keep spinning for a
    # while and take the cores from the one being timed (interleaved run by run, the fp32
    # GEMV took 20.7 ms against 8.9 ms alone).
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            model = apply_precision(gemv_graph(weights), precision)
            path = Path(tmp) / f"{precision}.onnx"
            onnx.save_model(model, str(path))
            session = ort.InferenceSession(str(path), session_options(threads),
                                           providers=["CPUExecutionProvider"])
            feeds = {i.name: np.random.default_rng(0).standard_normal(
                (1, int(i.name[1:])), dtype=np.float32) for i in session.get_inputs()}
            for _ in range(3):  # warm-up: prepacking, page faults
                session.run(None, feeds)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                session.run(None, feeds)
                times.append((time.perf_counter() - t0) * 1e3)
            floors[precision] = Floor(precision, _weight_bytes(model), statistics.median(times),
                                      times)
            del session
    return floors
