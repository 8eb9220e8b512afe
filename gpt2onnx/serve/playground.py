"""The playground page served at ``/``: one HTML file with its script inline, no build
step and no fetches but this server's own API (its Content-Security-Policy says so)."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def playground_html() -> str:
    return (resources.files("gpt2onnx.serve") / "static" / "playground.html").read_text(
        encoding="utf-8")
