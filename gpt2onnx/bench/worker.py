"""One variant in its own process: ``python -m gpt2onnx.bench.worker SPEC_JSON [--cold T0]``.

Serve mode (default): load the engine, answer one JSON command per stdin line with one
JSON line (``{"op": "decode"|"positions"|"info"|"quit", ...}``).
Cold mode (``--cold T0``, T0 = the parent's ``time.time()`` just before it started this
process): load, produce the first token, report seconds from T0 to that token, then
generate a few more tokens and report the process's peak RSS.

Standard library only at the top: this module also runs in the optimum venv.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict
from typing import Any, TextIO


def _reply_channel() -> TextIO:
    """Keep the real stdout for replies and send anything libraries print to stderr."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return channel


def _peak_rss_mb() -> float:
    """This process's peak resident set (MB = 1e6 bytes). VmHWM, not getrusage's ru_maxrss:
    Linux carries ru_maxrss over from the parent across fork + exec."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def serve(spec: dict[str, Any]) -> None:
    from gpt2onnx.bench.variants import make_engine

    reply = _reply_channel()
    t0 = time.perf_counter()
    engine = make_engine(spec)
    reply.write(json.dumps({"ok": True, "load_s": time.perf_counter() - t0,
                            "info": {**engine.info(), "samples": engine.samples}}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op == "decode":
            # Only engines that sample are asked to (``Engine.samples``).
            extra = {"sampled": True} if cmd.get("sampled") else {}
            out: dict[str, Any] = asdict(engine.decode(cmd["prompt"], cmd["new_tokens"],
                                                       cmd.get("batch", 1), **extra))
        elif op == "positions":
            ms = engine.position_ms(cmd["prompt"], cmd["positions"], cmd["window"])
            out = {"position_ms": {str(k): v for k, v in ms.items()}}
        elif op == "step_ms":
            out = {"step_ms": engine.step_ms_at(cmd["prompt"], cmd["position"], cmd["window"])}
        elif op == "info":
            out = {"info": engine.info(), "peak_rss_mb": _peak_rss_mb()}
        else:
            out = {"error": f"unknown op {op!r}"}
        reply.write(json.dumps(out) + "\n")


def cold(spec: dict[str, Any], t0: float, prompt: list[int], new_tokens: int) -> None:
    from gpt2onnx.bench.variants import make_engine

    reply = _reply_channel()
    engine = make_engine(spec)
    engine.decode(prompt, 1, 1)
    first_token_s = time.time() - t0
    engine.decode(prompt, new_tokens, 1)
    # An engine that runs its model in a child process (llama.cpp's gen_ids) holds its
    # memory there: add the largest finished child's peak (0 for the others).
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e6
    reply.write(json.dumps({"first_token_s": first_token_s,
                            "peak_rss_mb": _peak_rss_mb() + children,
                            "children_peak_rss_mb": children}) + "\n")


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    if len(argv) > 1 and argv[1] == "--cold":
        cold(spec, float(argv[2]), json.loads(argv[3]), int(argv[4]))
    else:
        serve(spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
