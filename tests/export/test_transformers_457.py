"""The exporter supports transformers 4.57.x (what optimum-onnx allows) as well as 5.x:
run it, with its PyTorch validation, inside the peer venv."""

from __future__ import annotations

import json

from tests.peer_venv import requires_peer, run_peer


@requires_peer
def test_exporter_under_transformers_4_57(tiny_checkpoint, tmp_path):
    version = run_peer(["-c", "import transformers; print(transformers.__version__)"])
    assert version.stdout.startswith("4.57"), version.stdout + version.stderr
    for layout in ("standard", "fused"):
        out = tmp_path / layout
        proc = run_peer(["-m", "gpt2onnx.export", str(tiny_checkpoint), str(out), "--layout",
                         layout])
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((out / "export_report.json").read_text())
        assert report["validation"]["passed"]
