"""A folder exported by optimum-cli itself runs in our runtime with the same tokens."""

from __future__ import annotations

import subprocess

from gpt2onnx.runtime import GenerationParams, Model
from tests.peer_venv import PEER_CLI, requires_peer


@requires_peer
def test_optimum_cli_folder_generates_our_tokens(tiny_checkpoint, tiny_fused, tmp_path):
    out = tmp_path / "optimum"
    proc = subprocess.run([str(PEER_CLI), "export", "onnx", "--model", str(tiny_checkpoint),
                           "--task", "text-generation-with-past", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = Model(out)
    assert theirs.manifest.layout == "standard" and theirs.manifest.source.startswith("optimum")
    params = GenerationParams(max_new_tokens=12, stop_on_eos=False)
    prompts = ["Hello world", "The quick brown fox"]
    ours = [r.token_ids for r in Model(tiny_fused).generate_batch(prompts, params)]
    assert [r.token_ids for r in theirs.generate_batch(prompts, params)] == ours
