"""Prefix caching: the KV of prompt blocks seen recently, reused by later prompts that start
with the same tokens (a system prompt, few-shot examples, the same document asked about
again), so that only the rest of such a prompt is prefilled.

A prompt is cut into whole blocks of ``block_tokens``. A block is keyed by a digest of its
tokens and of the key of the block before it, so a key names one whole prefix, never a
block that merely has the same tokens elsewhere. Blocks live in host memory (one array
per block, every layer's keys and values), evicted least recently used first once the
store passes its byte budget. Looking up touches a prefix's blocks from its last to its
first, so a prefix's first blocks, which every longer match needs, go last.

Reuse never changes the output: a block holds exactly what the model wrote for those
positions (the positions before a token are all it attends to), and a prompt always
prefills at least its last token so that its first generated token comes from a run.
Only CPU caches take part: their buffers are numpy arrays that blocks copy in and out of.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gpt2onnx.errors import InvalidParameterError

DEFAULT_BLOCK_TOKENS = 16
DEFAULT_BUDGET_MB = 256


@dataclass
class PrefixCacheStats:
    """Counts since the store was made (the server exports them as metrics)."""

    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens whose KV came from the store (prefill saved)
    lookups: int = 0  # prompts looked up
    hit_lookups: int = 0  # prompts that reused at least one block
    stored_blocks: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        """Share of looked-up prompt tokens that were not prefilled."""
        return self.hits / self.queries if self.queries else 0.0


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameterError(name, f"{name} must be an integer >= 1, got {value!r}.")
    return value


class PrefixCache:
    """Recently prefilled prompt blocks, by prefix.

    Args:
        block_tokens: tokens per block; matching is on whole blocks.
        budget_bytes: the most host memory the blocks may take (gpt2 in fp32: 73.7 KB per
            token, so the default 256 MB holds about 3,600 tokens).
    """

    def __init__(self, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                 budget_bytes: int = DEFAULT_BUDGET_MB << 20) -> None:
        self.block_tokens = _check_positive("block_tokens", block_tokens)
        self.budget_bytes = _check_positive("budget_bytes", budget_bytes)
        self._blocks: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self, ids: Sequence[int], blocks: int) -> list[bytes]:
        """Keys of the first ``blocks`` whole blocks of ``ids``."""
        out: list[bytes] = []
        parent = b""
        b = self.block_tokens
        tokens = np.asarray(ids[:blocks * b], np.int64)
        for i in range(blocks):
            h = hashlib.blake2b(parent, digest_size=16)
            h.update(tokens[i * b:(i + 1) * b].tobytes())
            parent = h.digest()
            out.append(parent)
        return out

    def load(self, ids: Sequence[int], cache, slot: int, have: int | None = None) -> int:
        """Write the longest stored prefix of ``ids`` into ``slot`` of ``cache``: an empty
        slot, or (``have``) one holding the first ``have`` tokens an earlier call loaded,
        looked up again because a row that prefilled since may have stored more;
        returns how many tokens the slot holds now (whole blocks, never the last token)."""
        b = self.block_tokens
        usable = (len(ids) - 1) // b
        keys = self.keys(ids, usable)
        found = 0
        for key in keys:
            if key not in self._blocks:
                break
            found += 1
        done = min((have or 0) // b, found)
        if have is None:
            self.stats.lookups += 1
            self.stats.queries += len(ids)
        for key in reversed(keys[:found]):  # the first blocks end up most recent
            self._blocks.move_to_end(key)
        for i in range(done, found):
            cache.write_tokens(slot, i * b, self._blocks[keys[i]])
        self.stats.hits += (found - done) * b
        if found and not done:
            self.stats.hit_lookups += 1
        return max(have or 0, found * b)

    def store(self, ids: Sequence[int], cache, slot: int, length: int) -> None:
        """Keep the whole blocks among the first ``length`` tokens of ``ids`` (which
        ``slot`` holds) that the store does not have yet."""
        blocks = min(length, len(ids)) // self.block_tokens
        b = self.block_tokens
        keys = self.keys(ids, blocks)
        for i, key in enumerate(keys):
            if key in self._blocks:
                continue
            block = np.empty(cache.block_shape(b), cache.dtype)
            if block.nbytes > self.budget_bytes:
                return  # one block alone is over the budget: nothing can be kept
            cache.read_tokens(slot, i * b, (i + 1) * b, block)
            self._blocks[key] = block
            self.bytes += block.nbytes
            self.stats.stored_blocks += 1
        for key in reversed(keys):
            self._blocks.move_to_end(key)
        while self.bytes > self.budget_bytes and self._blocks:
            _, old = self._blocks.popitem(last=False)
            self.bytes -= old.nbytes
            self.stats.evicted_blocks += 1

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0
