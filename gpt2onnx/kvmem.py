"""KV-cache memory of the GPT-2 family: 2 x layers x batch x heads x head_dim x seq x bytes.

    python -m gpt2onnx.kvmem                       # every model, a few batches and lengths
    python -m gpt2onnx.kvmem --model gpt2 --batch 1 --seq 1024 --dtype fp32

The fused layout preallocates exactly this at max_length per batch size, so the table
is also what ``Model.cache(batch)`` costs. Standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpt2onnx.cli import Parser, int_in, run_main


@dataclass(frozen=True)
class Arch:
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int = 1024

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# The published GPT-2 family configurations (parameters in the comments).
GPT2_FAMILY: dict[str, Arch] = {
    "distilgpt2": Arch(6, 12, 768),  # 82M
    "gpt2": Arch(12, 12, 768),  # 124M
    "gpt2-medium": Arch(24, 16, 1024),  # 355M
    "gpt2-large": Arch(36, 20, 1280),  # 774M
    "gpt2-xl": Arch(48, 25, 1600),  # 1.5B
}
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


def kv_cache_bytes(n_layer: int, n_head: int, head_dim: int, batch: int, seq: int,
                   dtype_bytes: int) -> int:
    """Bytes of keys and values for ``batch`` rows of ``seq`` tokens."""
    return 2 * n_layer * batch * n_head * head_dim * seq * dtype_bytes


def arch_bytes(arch: Arch, batch: int, seq: int, dtype: str) -> int:
    return kv_cache_bytes(arch.n_layer, arch.n_head, arch.head_dim, batch, seq,
                          DTYPE_BYTES[dtype])


def human(n: float) -> str:
    """Binary units: 75497472 -> '72.0 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(models: Sequence[str], batches: Sequence[int], seqs: Sequence[int],
          dtypes: Sequence[str]) -> str:
    """A Markdown table: one row per (model, dtype, batch), one column per sequence length."""
    lines = ["| model | dtype | batch | " + " | ".join(f"seq {s}" for s in seqs) + " |",
             "|---|---|---:|" + "---:|" * len(seqs)]
    for name in models:
        arch = GPT2_FAMILY[name]
        for dtype in dtypes:
            for b in batches:
                cells = " | ".join(human(arch_bytes(arch, b, s, dtype)) for s in seqs)
                lines.append(f"| {name} | {dtype} | {b} | {cells} |")
    return "\n".join(lines)


# A table cell is bytes for batch x seq tokens; beyond these the sizes are not a cache anyone
# holds, and huge values would only print exbibytes.
MAX_BATCH = 1 << 20
MAX_SEQ = 1 << 24


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    p = Parser(prog="python -m gpt2onnx.kvmem", description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", choices=sorted(GPT2_FAMILY), default=list(GPT2_FAMILY))
    p.add_argument("--batch", nargs="+", type=int_in(1, MAX_BATCH), default=[1, 8, 32])
    p.add_argument("--seq", nargs="+", type=int_in(1, MAX_SEQ), default=[128, 512, 1024])
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPE_BYTES), default=["fp32", "fp16"])
    args = p.parse_args(argv)
    print(table(args.model, args.batch, args.seq, args.dtype), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
