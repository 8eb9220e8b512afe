"""Shared fixtures: tiny GPT-2 checkpoints built locally (no hub) and their exports.

Checkpoints use the real GPT-2 tokenizer (tests/data/gpt2-tokenizer) so text round-trips
as it would with `gpt2` (a small trained byte-level BPE when vocab_size is below GPT-2's);
weights are random from a fixed seed.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parent / "data"
TOKENIZER_DIR = DATA / "gpt2-tokenizer"
EMBEDDED_MODEL = Path(__file__).parent.parent / "models" / "pydoc-tiny"

TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)
# The full-size gpt2 (124M) architecture; random weights (no hub here).
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)


GPT2_VOCAB = 50257
# Text a small tokenizer is trained on: every byte is in a byte-level alphabet anyway, so
# any text encodes; this makes common English pieces single tokens.
_TRAINING_TEXT = (
    "Return a new list containing all items from the iterable in ascending order.",
    "The module provides functions for working with files and directories, such as",
    "If the optional argument is given, the function raises a ValueError when the value",
    "Once upon a time there was a little town by the sea where everybody knew each other.",
    "def main(argv: list[str] | None = None) -> int: return 0",
)


def build_checkpoint(folder: Path, seed: int = 0, **config: Any) -> Path:
    """Save a random-weight GPT2LMHeadModel and a tokenizer that fits it into ``folder``:
    the real GPT-2 tokenizer at GPT-2's vocabulary size, else a byte-level BPE trained
    here with at most ``vocab_size`` tokens (and BOS/EOS 0, its <|endoftext|>)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    merged = {**TINY, **config}
    small = merged["vocab_size"] < GPT2_VOCAB
    if small:
        merged = {"bos_token_id": 0, "eos_token_id": 0, **merged}
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**merged)).eval()
    model.save_pretrained(folder)
    if small:
        save_small_tokenizer(folder, merged["vocab_size"])
        return folder
    for f in TOKENIZER_DIR.iterdir():
        if f.name != "README.md":
            shutil.copy(f, folder / f.name)
    return folder


def save_small_tokenizer(folder: Path, vocab_size: int) -> None:
    """A GPT-2 style (byte-level BPE) tokenizer with ids below ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    assert tokenizer.get_vocab_size() <= vocab_size, "vocab_size is below the byte alphabet"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(str(folder))


@pytest.fixture(scope="session", autouse=True)
def no_spinning() -> Iterator[None]:
    """Intra-op threads sleep when idle in tests: one pytest process holds many sessions,
    engine threads and servers on few cores, the oversubscribed case where spinning is
    slower (tests/runtime/test_session_options.py covers the default itself)."""
    from gpt2onnx.runtime.folder import SPIN_ENV

    before = os.environ.get(SPIN_ENV)
    os.environ[SPIN_ENV] = "0"
    yield
    if before is None:
        os.environ.pop(SPIN_ENV, None)
    else:
        os.environ[SPIN_ENV] = before


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Runtime's record of verified files goes to a temporary folder, not ~/.cache
    (os.environ, so subprocesses started by tests use it too)."""
    from gpt2onnx.runtime.verified import CACHE_DIR_ENV

    folder = tmp_path_factory.mktemp("gpt2onnx-cache")
    before = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(folder)
    yield folder
    if before is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = before


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make_checkpoint(seed=0, **GPT2Config fields) -> a local checkpoint folder (cached)."""
    made: dict[str, Path] = {}

    def make(seed: int = 0, **config: Any) -> Path:
        key = repr((seed, sorted(config.items())))
        if key not in made:
            made[key] = build_checkpoint(tmp_path_factory.mktemp("ckpt"), seed, **config)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint()


@pytest.fixture(scope="session")
def export_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """export_folder(checkpoint, layout=..., precision=..., **options) -> model folder (cached)."""
    from gpt2onnx.export.api import ExportOptions, export_model

    made: dict[str, Path] = {}

    def export(checkpoint: Path, **options: Any) -> Path:
        key = repr((str(checkpoint), sorted(options.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("export") / "model"
            export_model(checkpoint, out, ExportOptions(**options))
            made[key] = out
        return made[key]

    return export


@pytest.fixture(scope="session")
def tiny_standard(tiny_checkpoint: Path, export_folder: Callable[..., Path]) -> Path:
    return export_folder(tiny_checkpoint, layout="standard")


@pytest.fixture(scope="session")
def tiny_fused(tiny_checkpoint: Path, export_folder: Callable[..., Path]) -> Path:
    return export_folder(tiny_checkpoint, layout="fused")


def default_sigint() -> None:
    """``preexec_fn`` for a child a test interrupts with SIGINT: a shell starts background
    jobs (``cmd &``, nohup) with SIGINT ignored, children inherit that, and our CLIs rightly
    keep an inherited ignore; the test wants the disposition a terminal gives."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
