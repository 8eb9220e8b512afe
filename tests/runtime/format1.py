"""A fused folder as gpt2onnx wrote it before format 2: no ``logits_index`` input, logits
[batch, vocab] at each row's last real token. Made by exporting today's graph and putting
back the old tail (the old exporter is gone; the old folders are still out there)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from gpt2onnx.contract import LOGITS, LOGITS_INDEX, NEXT_TOKEN, POSITION_IDS, SEQLENS_K, sha256_file
from gpt2onnx.export.api import ExportOptions, export_model


def write_format1_folder(checkpoint: Path, folder: Path) -> Path:
    """Export ``checkpoint`` twice: ``folder.parent / 'v2'`` as today, ``folder`` in format 1."""
    v2 = folder.parent / "v2"
    export_model(checkpoint, v2, ExportOptions(layout="fused", validate=False))
    # Format-1 folders predate the mixed graph.
    export_model(checkpoint, folder, ExportOptions(layout="fused", validate=False,
                                                   mixed_graph=False))
    graph_path = folder / "model.onnx"
    model = onnx.load(str(graph_path))
    g = model.graph
    # The old index: seqlens_k - position_ids[:, 0], as [batch, 1].
    g.initializer.append(helper.make_tensor("v1_zero", TensorProto.INT64, [1], [0]))
    g.initializer.append(helper.make_tensor("v1_one", TensorProto.INT64, [1], [1]))
    old_tail = [
        helper.make_node("Gather", [POSITION_IDS, "v1_zero"], ["v1_past"], axis=1),
        helper.make_node("Cast", [SEQLENS_K], ["v1_seq64"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["v1_seq64", "v1_one"], ["v1_seq2d"]),
        helper.make_node("Sub", ["v1_seq2d", "v1_past"], ["v1_last"]),
    ]
    nodes = list(g.node)
    argmax = next(n for n in nodes if NEXT_TOKEN in n.output)
    nodes.remove(argmax)
    for n in nodes:
        n.input[:] = ["v1_last" if i == LOGITS_INDEX else i for i in n.input]
        n.output[:] = ["v1_logits3d" if o == LOGITS else o for o in n.output]
    nodes = old_tail + nodes + [
        helper.make_node("Squeeze", ["v1_logits3d", "v1_one"], [LOGITS]), argmax]
    del g.node[:]
    g.node.extend(nodes)
    kept = [i for i in g.input if i.name != LOGITS_INDEX]
    del g.input[:]
    g.input.extend(kept)
    for out in g.output:
        if out.name in (LOGITS, NEXT_TOKEN):
            dims = out.type.tensor_type.shape.dim
            del dims[1]  # [batch, kept, vocab] -> [batch, vocab]; [batch, kept] -> [batch]
    onnx.save(model, str(graph_path))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest["inputs"] = [n for n in manifest["inputs"] if n != LOGITS_INDEX]
    manifest["files"]["model.onnx"] = sha256_file(graph_path)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder
