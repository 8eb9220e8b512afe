"""The server with --speculative: the same greedy text as without, the acceptance
counters in /metrics, and refused configurations."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gpt2onnx.errors import InvalidParameterError, ModelFolderError
from gpt2onnx.runtime import Model
from gpt2onnx.serve import Engine, EngineConfig
from tests.serve.helpers import LiveServer, make_app, parse_sse, stream_text

GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPTS = ["The cat sat on the mat. The cat sat on the", "Once upon a time",
           "1, 2, 3, 4, 1, 2, 3, 4, 1, 2"]


@pytest.fixture(scope="module")
def int8_draft(tiny_checkpoint: Path, export_folder) -> Path:
    return export_folder(tiny_checkpoint, layout="fused", precision="int8")


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("how", ["ngram", "draft"])
def test_speculative_server_gives_the_greedy_text(make_engine, greedy_text: Callable[..., str],
                                                   int8_draft: Path, how: str) -> None:
    spec = "ngram" if how == "ngram" else f"draft:{int8_draft}"
    engine = make_engine(max_batch_size=4, speculative=spec, speculative_max_batch=4)
    with TestClient(make_app(engine)) as client:
        for prompt in PROMPTS:
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 20,
                                                     **GREEDY})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == greedy_text(prompt, 20, stop_on_eos=False)
        # Several rows at once (each verifies in its own run) and a stream.
        r = client.post("/v1/completions", json={"prompt": PROMPTS, "max_tokens": 12, **GREEDY})
        texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
        assert texts == [greedy_text(p, 12, stop_on_eos=False) for p in PROMPTS]
        r = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 20,
                                                 "stream": True, **GREEDY})
        chunks, done = parse_sse(r.text)
        assert done and stream_text(chunks) == greedy_text(PROMPTS[0], 20, stop_on_eos=False)
        metrics = client.get("/metrics").text
    rounds = _metric(metrics, "gpt2onnx_spec_verifications")
    drafted = _metric(metrics, "gpt2onnx_spec_draft_tokens")
    accepted = _metric(metrics, "gpt2onnx_spec_accepted_tokens")
    emitted = _metric(metrics, "gpt2onnx_spec_emitted_tokens")
    assert rounds > 0 and 0 < accepted <= drafted and emitted >= rounds + accepted - 1


def test_official_openai_client_against_a_speculative_server(
        make_engine, greedy_text: Callable[..., str]) -> None:
    openai = pytest.importorskip("openai")
    engine = make_engine(speculative="ngram")
    server = LiveServer(make_app(engine))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.choices[0].text == greedy_text(PROMPTS[0], 16, stop_on_eos=False)
        pieces = [c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) if c.choices]
        assert "".join(pieces) == greedy_text(PROMPTS[2], 16, stop_on_eos=False)
    finally:
        server.close()


@pytest.mark.parametrize(("config", "match"), [
    (dict(speculative="bogus"), "speculative must be 'ngram' or 'draft:FOLDER', got 'bogus'"),
    (dict(speculative="draft:"), "speculative must be 'ngram' or 'draft:FOLDER'"),
    (dict(speculative="ngram", num_draft_tokens=0), r"num_draft_tokens must be an integer"),
    (dict(speculative="ngram", speculative_max_batch=-2), "speculative_max_batch must be"),
])
def test_bad_speculative_config(config, match) -> None:
    with pytest.raises(InvalidParameterError, match=match):
        EngineConfig(**config)


def test_bad_draft_folders_fail_the_load(tiny_fused: Path, tiny_standard: Path,
                                         tmp_path: Path, make_checkpoint, export_folder) -> None:
    for spec, error, match in (
            (f"draft:{tmp_path}", InvalidParameterError, "has no manifest.json"),
            (f"draft:{tiny_standard}", ModelFolderError, "fused layout"),
            (f"draft:{export_folder(make_checkpoint(seed=1, vocab_size=1000), layout='fused')}",
             ModelFolderError, "vocabulary of 1000 tokens")):
        engine = Engine(lambda: Model(tiny_fused), EngineConfig(speculative=spec))
        with pytest.raises(error, match=match):
            engine.start().wait_ready(timeout=60)
        engine.stop(drain_timeout=0)
    engine = Engine(lambda: Model(tiny_standard), EngineConfig(speculative="ngram"))
    with pytest.raises(InvalidParameterError, match="needs a fused model folder"):
        engine.start().wait_ready(timeout=60)
    engine.stop(drain_timeout=0)


def test_serve_cli_refuses_bad_speculation_with_exit_2(tiny_fused: Path, tmp_path: Path) -> None:
    for extra, message in ((["--speculative", "bogus"], "speculative must be 'ngram'"),
                           (["--speculative", f"draft:{tmp_path}"], "manifest")):
        proc = subprocess.run([sys.executable, "-m", "gpt2onnx.serve", str(tiny_fused),
                               "--port", "0", *extra], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
