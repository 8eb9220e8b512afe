"""Scoring (per-token log-probs, perplexity) against transformers' own model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.export.validate import THRESHOLDS
from gpt2onnx.runtime import GenerationParams, Model
from gpt2onnx.runtime.scoring import windows

TEXT = ("The module provides functions for working with files and directories, such as "
        "listing the entries of a folder, copying and moving files, and checking whether a "
        "path exists. Every function raises OSError when the operating system refuses.")


def _reference_logprobs(checkpoint: Path, ids: list[int]) -> np.ndarray:
    """transformers' log-softmax of each token given the ones before it: [len - 1]."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy(), logits.numpy()


@pytest.mark.parametrize("layout,precision", [("standard", "fp32"), ("fused", "fp32"),
                                              ("fused", "fp16"), ("fused", "int8"),
                                              ("fused", "int4")])
def test_score_equals_transformers_log_softmax(tiny_checkpoint, export_folder, layout,
                                               precision):
    model = Model(export_folder(tiny_checkpoint, layout=layout, precision=precision))
    ids = model.encode(TEXT)[:100]
    ref, ref_logits = _reference_logprobs(tiny_checkpoint, ids)
    got = model.score(ids, top_logprobs=3)
    assert got.logprobs[0] is None and got.top_logprobs[0] is None
    diff = np.abs(np.array(got.logprobs[1:]) - ref)
    # fp32 to 1e-4; quantized precisions within their validation threshold (relative to the
    # reference logits' range, as export validation measures logits).
    span = float(ref_logits.max() - ref_logits.min())
    limit = 1e-4 if precision == "fp32" else THRESHOLDS[precision].logits_rel * span
    assert diff.max() <= limit, f"max |logprob diff| {diff.max():.3g} > {limit:.3g}"
    for lp, top in zip(got.logprobs[1:], got.top_logprobs[1:], strict=True):
        assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
        assert lp <= top[0][1] + 1e-6


def test_sliding_window_matches_the_transformers_perplexity_guide(tiny_checkpoint,
                                                                  tiny_fused):
    """A text longer than the context: windows of 64 every 24 tokens, each token scored
    once with the context its window gives, summed as the guide does."""
    import torch
    from transformers import GPT2LMHeadModel

    model = Model(tiny_fused)
    ids = (model.encode(TEXT) * 6)[:230]
    assert len(ids) > model.context_length
    got = model.score(ids, window=64, stride=24)
    hf = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    seq = torch.tensor([ids])
    for begin in range(0, len(ids), 24):
        end = min(begin + 64, len(ids))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target).loss
        valid = int((target[:, 1:] != -100).sum())  # the model shifts labels by one
        nll_sum += float(loss) * valid
        n_tokens += valid
        prev_end = end
        if end == len(ids):
            break
    assert got.scored == n_tokens == len(ids) - 1
    assert math.isclose(got.perplexity, math.exp(nll_sum / n_tokens), rel_tol=1e-4)


def test_windows_score_every_token_once():
    for n, window, stride in [(10, 4, 1), (10, 4, 3), (1000, 128, 64), (5, 128, 64), (2, 2, 1)]:
        scored = [i for _, end, first in windows(n, window, stride) for i in range(first, end)]
        assert scored == list(range(1, n))
        for begin, end, first in windows(n, window, stride):
            assert begin < first <= end and end - begin <= window


def test_prompt_logprobs_in_a_generation_equal_score(tiny_fused):
    model = Model(tiny_fused)
    ids = model.encode(TEXT)[:40]
    scored = model.score(ids, top_logprobs=2)
    gen = model.generator([ids], GenerationParams(max_new_tokens=3, prompt_logprobs=2))
    while not gen.is_done():
        gen.generate_next_token()
    row = gen.rows[0]
    assert row.prompt_logprobs[0] is None
    np.testing.assert_allclose([e.logprob for e in row.prompt_logprobs[1:]],
                               scored.logprobs[1:], atol=1e-5)
    assert [tuple(t for t, _ in e.top) for e in row.prompt_logprobs[1:]] == \
        [tuple(t for t, _ in top) for top in scored.top_logprobs[1:]]
    # The generated tokens are the ones a plain generation gives.
    assert row.token_ids == model.generate(ids, max_new_tokens=3).token_ids


def test_max_new_tokens_zero_scores_without_generating(tiny_fused):
    model = Model(tiny_fused)
    gen = model.generator(["Hello world"], GenerationParams(max_new_tokens=0, prompt_logprobs=0))
    gen.generate_next_token()
    assert gen.is_done()
    assert gen.rows[0].token_ids == [] and gen.rows[0].finish_reason == "length"
    assert len(gen.rows[0].prompt_logprobs) == len(model.encode("Hello world"))


@pytest.mark.parametrize("kwargs,match", [
    ({"window": 1}, "window must be an integer in \\[2, 128\\]"),
    ({"window": 500}, "window must be an integer in \\[2, 128\\]"),
    ({"window": 64, "stride": 64}, "stride must be an integer in \\[1, 63\\]"),
    ({"stride": 0}, "stride must be"),
    ({"top_logprobs": 21}, "top_logprobs must be an integer in \\[0, 20\\]"),
])
def test_bad_score_arguments(tiny_fused, kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        Model(tiny_fused).score("Hello world", **kwargs)


def test_score_refuses_empty_and_out_of_vocabulary(tiny_fused):
    model = Model(tiny_fused)
    with pytest.raises(InvalidParameterError, match="empty"):
        model.score([])
    with pytest.raises(InvalidParameterError, match="outside the vocabulary"):
        model.score([1, 99999])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2onnx.runtime.score", *args],
                          capture_output=True, text=True, timeout=120)


def test_score_cli(tiny_fused, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT)
    b.write_text(TEXT * 3)
    proc = _cli(str(tiny_fused), str(a), str(b), "--json", "--stride", "32")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    model = Model(tiny_fused)
    for row, text in zip(out["files"], (TEXT, TEXT * 3), strict=True):
        expected = model.score(text, stride=32)
        assert row["tokens_scored"] == expected.scored
        assert math.isclose(row["perplexity"], expected.perplexity, rel_tol=1e-9)
        nll = -expected.total_logprob
        assert math.isclose(row["bits_per_byte"], nll / math.log(2) / len(text.encode()),
                            rel_tol=1e-9)
    total = out["overall"]
    assert total["tokens_scored"] == sum(r["tokens_scored"] for r in out["files"])
    proc = _cli(str(tiny_fused), str(a))
    assert proc.returncode == 0 and "perplexity" in proc.stdout


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing.txt", "cannot read"),
    (lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe\x00") and p / "bin.txt", "not UTF-8"),
])
def test_score_cli_bad_input_exits_2(tiny_fused, tmp_path, make, match):
    proc = _cli(str(tiny_fused), str(make(tmp_path)))
    assert proc.returncode == 2
    assert match in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = _cli(str(tiny_fused), str(tmp_path), "--stride", "500")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
