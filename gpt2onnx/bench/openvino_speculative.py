"""OpenVINO GenAI's own speculative decoding, on the workload of ``bench.speculative``.

``python -m gpt2onnx.bench.openvino_speculative TARGET_IR DRAFT_IR REQUEST_JSON`` runs in
the OpenVINO venv (``make bench-openvino-setup``) and prints one JSON line: for each mode
(plain, prompt lookup, an int8 draft of the same checkpoint, each k asked for) the
median ms per generated token over interleaved runs and the last run's tokens, which the
parent compares with ours. Greedy, batch 1, token ids in and out (no tokenizer: the
same ids reach both engines).

Standard library only at the top: the parent (our venv) imports ``export_ir`` and
``run`` from here without OpenVINO installed.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def export_ir(python: Path, ckpt: Path, out: Path, weights: str) -> Path:
    """``optimum-cli export openvino`` of ``ckpt`` with weight format fp32 or int8, once."""
    if (out / "openvino_model.xml").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cli = python.parent / "optimum-cli"
    cmd = [str(cli), "export", "openvino", "--model", str(ckpt), "--task",
           "text-generation-with-past", "--weight-format", weights, str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0 or not (tmp / "openvino_model.xml").exists():
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise RuntimeError(f"OpenVINO export failed: {' '.join(cmd)}")
    tmp.rename(out)
    return out


def run(python: Path, target: Path, draft: Path, prompt: list[int], new_tokens: int,
        ks: list[int], runs: int) -> dict[str, Any]:
    """Run this module in the OpenVINO venv; its JSON result."""
    request = json.dumps({"prompt": prompt, "new_tokens": new_tokens, "ks": ks,
                          "runs": runs})
    done = subprocess.run([str(python), "-m", "gpt2onnx.bench.openvino_speculative",
                           str(target), str(draft), request], capture_output=True, text=True,
                          check=False, cwd=Path(__file__).resolve().parents[2])
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise RuntimeError("the OpenVINO GenAI run failed; see above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main(target: str, draft: str, request: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import openvino as ov
    import openvino_genai as og

    prompt, new = request["prompt"], request["new_tokens"]
    inputs = og.TokenizedInputs(ov.Tensor(np.array([prompt], dtype=np.int64)),
                                ov.Tensor(np.ones((1, len(prompt)), dtype=np.int64)))

    def config(tokens: int, k: int | None = None, lookup: bool = False) -> Any:
        c = og.GenerationConfig()
        c.max_new_tokens = c.min_new_tokens = tokens  # every run the same length
        c.do_sample = False
        if k is not None:
            c.num_assistant_tokens = k
        if lookup:
            c.max_ngram_size = 3
        return c

    plain = og.LLMPipeline(target, "CPU")
    lookup = og.LLMPipeline(target, "CPU", prompt_lookup=True)
    drafted = og.LLMPipeline(target, "CPU", draft_model=og.draft_model(draft, "CPU"))
    modes: dict[str, tuple[Any, int | None, bool]] = {"plain": (plain, None, False)}
    for k in request["ks"]:
        modes[f"prompt lookup k={k}"] = (lookup, k, True)
        modes[f"int8 draft k={k}"] = (drafted, k, False)
    for pipe, k, is_lookup in modes.values():  # warm-up
        pipe.generate(inputs, config(8, k, is_lookup))
    ms: dict[str, list[float]] = {m: [] for m in modes}
    tokens: dict[str, list[int]] = {}
    names = list(modes)

    def timed(pipe: Any, c: Any) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        result = pipe.generate(inputs, c)
        return time.perf_counter() - t0, [int(t) for t in result.tokens[0]]

    for r in range(request["runs"]):
        for name in names[r % len(names):] + names[:r % len(names)]:
            pipe, k, is_lookup = modes[name]
            # As bench.speculative measures ours: the decode after the first token, so
            # the prompt's prefill (timed alone, just before) is left out.
            first, _ = timed(pipe, config(1, k, is_lookup))
            elapsed, tokens[name] = timed(pipe, config(new, k, is_lookup))
            ms[name].append((elapsed - first) * 1e3 / max(len(tokens[name]) - 1, 1))
    from importlib.metadata import version

    return {"openvino_genai": version("openvino-genai"), "threads": None,
            "modes": {m: {"ms_per_token": statistics.median(ms[m]), "runs": ms[m],
                          "tokens": tokens[m]} for m in modes}}


if __name__ == "__main__":
    print(json.dumps(_main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))))
