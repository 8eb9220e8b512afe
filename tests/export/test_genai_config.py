"""Standard-layout folders carry a genai_config.json that onnxruntime-genai runs as is.

onnxruntime-genai's builder has no GPT-2; its runtime drives our graph from this file. The
check is token equality of greedy decoding between genai (in its own venv, its own
onnxruntime and tokenizer) and our runtime, on a random-weight checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt2onnx.contract import MANIFEST_FILE, sha256_file
from gpt2onnx.export.genai_config import GENAI_CONFIG_FILE
from gpt2onnx.runtime.model import Model
from tests.peer_venv import requires_genai, run_genai

# Greedy decoding of N new tokens from the given ids, and the ids genai's own tokenizer
# (read from the folder's tokenizer.json) gives for a text.
GENAI_SCRIPT = """
import json, sys
import numpy as np
import onnxruntime_genai as og
folder, ids, n, text = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = og.Model(folder)
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(ids[0]) + n, do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens(np.array(ids, dtype=np.int32))
out = [[] for _ in ids]
while not gen.is_done():
    gen.generate_next_token()
    for row, token in enumerate(gen.get_next_tokens()):
        out[row].append(int(token))
encoded = [int(t) for t in og.Tokenizer(model).encode(text)]
print(json.dumps({"tokens": out, "encoded": encoded}))
"""


def test_standard_folder_lists_its_genai_config(tiny_standard: Path) -> None:
    manifest = json.loads((tiny_standard / MANIFEST_FILE).read_text())
    config = json.loads((tiny_standard / GENAI_CONFIG_FILE).read_text())
    assert manifest["files"][GENAI_CONFIG_FILE] == sha256_file(tiny_standard / GENAI_CONFIG_FILE)
    decoder = config["model"]["decoder"]
    assert decoder["num_hidden_layers"] == manifest["n_layer"]
    assert decoder["head_size"] * decoder["num_attention_heads"] == manifest["n_embd"]
    assert config["model"]["vocab_size"] == manifest["vocab_size"]


def test_fused_folder_has_none(tiny_fused: Path) -> None:
    # Its in-place cache and seqlens_k / logits_index inputs are not genai's decoder IO.
    assert not (tiny_fused / GENAI_CONFIG_FILE).exists()


@requires_genai
@pytest.mark.parametrize("ids", [[[15496, 995, 11, 428]], [[464, 2068, 7586, 21831, 18045, 625]]])
def test_onnxruntime_genai_generates_our_greedy_tokens(tiny_standard: Path,
                                                       ids: list[list[int]]) -> None:
    new = 24
    text = "Hello world, this is GPT-2 on onnxruntime-genai."
    done = run_genai(["-c", GENAI_SCRIPT, str(tiny_standard), json.dumps(ids), str(new), text])
    assert done.returncode == 0, done.stderr[-2000:]
    genai = json.loads(done.stdout.strip().splitlines()[-1])
    model = Model(tiny_standard)
    ours = model.generate(ids[0], max_new_tokens=new, stop_on_eos=False)
    assert genai["tokens"][0] == ours.token_ids
    assert genai["encoded"] == model.encode(text)
