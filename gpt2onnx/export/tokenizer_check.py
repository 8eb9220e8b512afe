"""Load the export's tokenizer and prove it belongs to the model.

A folder whose tokenizer does not fit the model loads and validates on random ids, and
then fails (or writes garbage) on every real prompt; these checks fail the export instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpt2onnx.errors import ModelFolderError
from gpt2onnx.export.checkpoint import ModelSpec, check_local_source

# Any one of these makes a folder a tokenizer source transformers can load.
TOKENIZER_SOURCE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def _fix(spec: ModelSpec, explicit: bool = False) -> str:
    fix = (f"pass --tokenizer with the folder (or hub id) of the tokenizer this model was "
           f"trained with: one whose token ids fit the model's vocab_size={spec.vocab_size}")
    return fix + (" (or omit --tokenizer to use SOURCE's own)" if explicit else "")


def load_tokenizer(source: str, spec: ModelSpec, explicit: bool) -> Any:
    """The transformers fast tokenizer from ``source``, checked against ``spec``.

    Args:
        explicit: ``source`` came from --tokenizer (not from SOURCE), for the messages.

    Raises:
        ModelFolderError: there is no tokenizer, or it does not fit the model.
    """
    from transformers import AutoTokenizer

    where = f"--tokenizer {source!r}" if explicit else f"SOURCE {source!r}"
    check_local_source(source, "--tokenizer" if explicit else "SOURCE",
                       "a folder with tokenizer files (tokenizer.json)")
    folder = Path(source)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_SOURCE_FILES):
        raise ModelFolderError(
            f"{where} has no tokenizer files ({', '.join(TOKENIZER_SOURCE_FILES)}); "
            f"{_fix(spec, explicit)}.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise ModelFolderError(
            f"cannot load a tokenizer from {where}: {' '.join(str(exc).split())}; "
            f"{_fix(spec, explicit)}.") from exc
    check_tokenizer(tokenizer, spec, where, explicit)
    return tokenizer


def check_tokenizer(tokenizer: Any, spec: ModelSpec, where: str, explicit: bool = False
                    ) -> None:
    """The tokenizer's ids fit the model's vocabulary and its special ids exist.

    Raises:
        ModelFolderError: naming both sizes (or the missing id) and the tokenizer to pass.
    """
    ids = set(tokenizer.get_vocab().values())
    if len(ids) < 2:
        raise ModelFolderError(
            f"the tokenizer from {where} is empty ({len(ids)} token(s)); {_fix(spec, explicit)}.")
    top = max(ids)
    if top >= spec.vocab_size:
        raise ModelFolderError(
            f"the tokenizer from {where} has {len(ids)} tokens (ids up to {top}) but the "
            f"model's vocab_size is {spec.vocab_size}: its ids would index past the "
            f"embedding table; {_fix(spec, explicit)}.")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token = getattr(spec, name)
        if token is not None and token not in ids:
            raise ModelFolderError(
                f"the model's {name}={token} is not a token of the tokenizer from {where}; "
                f"{_fix(spec, explicit)}, or fix {name} in config.json.")
