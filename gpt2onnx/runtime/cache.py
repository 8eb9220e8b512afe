"""The KV cache's one owner per layout: device buffers, the IOBinding, and one model step.

Both classes expose the same verb to the decode loop: ``step(appends)`` appends any
number of tokens to any set of slots and returns logits only at the positions asked for
(a prompt into an empty slot, one token per running row, k+1 tokens of a verification,
every position for scoring), and ``rewind(slot, length)`` forgets a slot's tail. Only
the asked-for logits reach the host; the cache never does.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from gpt2onnx.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    LOGITS_INDEX,
    NEXT_TOKEN,
    POSITION_IDS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    Manifest,
    cache_names,
)
from gpt2onnx.errors import InvalidParameterError, PromptTooLongError

_NP = {"float32": np.float32, "float16": np.float16}
CUDA_GRAPH_ID = "gpu_graph_id"  # onnxruntime run option: which captured CUDA graph to use
_graph_ids = itertools.count(1)  # captured graphs are keyed per session: ids never repeat


@dataclass(frozen=True)
class Append:
    """One slot's part of a step.

    Args:
        slot: the cache row to append to.
        tokens: ids to append after the slot's current length (at least one).
        keep: how many of the trailing positions get logits back (0 = none, 1 = the last,
            ``len(tokens)`` = every one, as scoring needs).
    """

    slot: int
    tokens: Sequence[int] | np.ndarray
    keep: int = 1


class StepResult:
    """Logits of one step, per append in the order given. Arrays are views into buffers the
    next step overwrites: read (or copy) them before stepping again."""

    def __init__(self, logits: list[np.ndarray | None], argmax: list[np.ndarray | None],
                 fetch: list | None = None) -> None:
        self._logits = logits
        self._argmax = argmax
        self._fetch = fetch  # CUDA: (index, device value, row slice) copied on first read

    def logits(self, k: int) -> np.ndarray:
        """[keep_k, vocab] fp32 logits of append ``k``."""
        if self._logits[k] is None and self._fetch is not None:
            self._copy_device_logits()
        out = self._logits[k]
        assert out is not None
        return out

    def argmax(self, k: int) -> np.ndarray:
        """[keep_k] int64 argmax of append ``k``'s logits, computed on the device."""
        out = self._argmax[k]
        assert out is not None
        return out

    def _copy_device_logits(self) -> None:
        # On CUDA the logits stay on the device until a row needs them (sampling, log-probs);
        # then each run's buffer comes over once.
        host: dict[int, np.ndarray] = {}
        assert self._fetch is not None
        for k, value, row, keep in self._fetch:
            if id(value) not in host:
                array = value.numpy()
                host[id(value)] = array.reshape(array.shape[0], -1, array.shape[-1])
            self._logits[k] = host[id(value)][row, :keep]  # [keep, vocab]
        self._fetch = None


def _check_appends(appends: Sequence[Append], batch_size: int, lengths: np.ndarray,
                   capacity: int, vocab: int) -> None:
    if not appends:
        raise InvalidParameterError("appends", "a step needs at least one Append.")
    seen: set[int] = set()
    for a in appends:
        _check_slot(a.slot, batch_size)
        if a.slot in seen:
            raise InvalidParameterError("slot", f"slot {a.slot} appears twice in one step; "
                                        "append its tokens as one list.")
        seen.add(a.slot)
        n = len(a.tokens)
        if n < 1:
            raise InvalidParameterError("tokens", f"append to slot {a.slot} has no tokens; "
                                        "give at least one.")
        if isinstance(a.keep, bool) or not isinstance(a.keep, (int, np.integer)) \
                or not 0 <= a.keep <= n:
            raise InvalidParameterError("keep", f"keep must be an integer in [0, {n}] for {n} "
                                        f"tokens, got {a.keep!r}.")
        if n > 1:  # one-token appends are checked together below
            _check_ids(a.tokens, vocab)
        if int(lengths[a.slot]) + n > capacity:
            raise PromptTooLongError(
                "max_new_tokens", f"slot {a.slot} holds {int(lengths[a.slot])} tokens; "
                f"{n} more exceed the cache's capacity of {capacity} tokens. Shorten the text "
                "or ask for fewer new tokens.")


def _check_ids(tokens: Sequence[int] | np.ndarray, vocab: int) -> None:
    ids = np.asarray(tokens)
    if ids.size == 0:
        return
    if ids.dtype.kind not in "iu":
        raise InvalidParameterError("tokens", f"token ids must be integers, got {ids.dtype}.")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        bad = int(ids[(ids < 0) | (ids >= vocab)][0])
        raise InvalidParameterError("tokens", f"token id {bad} is outside the vocabulary "
                                    f"[0, {vocab - 1}]; use ids from this model's tokenizer.")


class StandardCache:
    """Standard layout: present = concat(past, new) is a fresh device buffer each step;
    it is bound, as the same OrtValue, as the next step's past. Every step adds the same
    number of columns to every row: a row's new tokens are right-aligned and the columns
    before them are masked pads (left padding on the first step, as transformers pads a
    batch). A row that is not advancing gets only masked columns, and a rewind masks a
    row's tail, so no row's real cache is ever overwritten."""

    supports_slots = False  # one tensor for the whole batch: rows cannot join or leave
    supports_slot_copy = False

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, batch_size: int,
                 device: tuple[str, int], pad_id: int) -> None:
        self.session = session
        self.manifest = manifest
        self.batch_size = batch_size
        self.capacity = manifest.context_length
        self.device_type, self.device_id = device
        self.pad_id = pad_id
        self.names = cache_names(manifest.n_layer)
        self.binding = session.io_binding()
        self.has_positions = POSITION_IDS in manifest.inputs
        self.reset()

    def reset(self) -> None:
        """Forget every row."""
        self.past: list[ort.OrtValue] = self._empty_past(self.batch_size)
        self.mask = np.zeros((self.batch_size, 0), np.int64)  # [batch, columns]
        self.lengths = np.zeros(self.batch_size, np.int64)  # real tokens per row

    def _empty_past(self, rows: int) -> list[ort.OrtValue]:
        m = self.manifest
        shape = (rows, m.n_head, 0, m.head_dim)
        dtype = _NP[m.cache_dtype]
        return [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device_type,
                                                          self.device_id) for _ in self.names]

    def step(self, appends: Sequence[Append]) -> StepResult:
        """Append each ``Append``'s tokens to its row in one run; rows not named advance by
        nothing. Returns the logits asked for."""
        _check_appends(appends, self.batch_size, self.lengths, self.capacity,
                       self.manifest.vocab_size)
        _check_ids([a.tokens[0] for a in appends if len(a.tokens) == 1], self.manifest.vocab_size)
        width = max(len(a.tokens) for a in appends)
        ids = np.full((self.batch_size, width), self.pad_id, np.int64)
        new_mask = np.zeros((self.batch_size, width), np.int64)
        for a in appends:
            n = len(a.tokens)
            ids[a.slot, width - n:] = a.tokens
            new_mask[a.slot, width - n:] = 1
        mask = np.concatenate([self.mask, new_mask], axis=1)
        # Each real token's position counts the real tokens before it.
        positions = np.clip(np.cumsum(mask, axis=1)[:, -width:] - 1, 0, None)
        b = self.binding
        b.bind_cpu_input(INPUT_IDS, ids)
        b.bind_cpu_input(ATTENTION_MASK, mask)
        if self.has_positions:
            b.bind_cpu_input(POSITION_IDS, positions)
        b.bind_output(LOGITS, "cpu")
        for (past, present), value in zip(self.names, self.past, strict=True):
            b.bind_ortvalue_input(past, value)
            b.bind_output(present, self.device_type, self.device_id)
        self.session.run_with_iobinding(b)
        outputs = b.get_outputs()
        # Binding order: logits, then present.* -- the next step's past, still on the device.
        self.past = list(outputs[1:])
        self.mask = mask
        self.lengths += new_mask.sum(axis=1)
        logits = outputs[0].numpy()  # [batch, width, vocab]
        kept = [logits[a.slot, width - a.keep:] for a in appends]
        return StepResult(list(kept), [k.argmax(axis=-1) for k in kept])

    def rewind(self, slot: int, length: int) -> None:
        """Keep only the first ``length`` tokens of ``slot``: the rest are masked out."""
        _check_rewind(slot, length, self.lengths, self.batch_size)
        real = np.flatnonzero(self.mask[slot])
        self.mask[slot, real[length:]] = 0
        self.lengths[slot] = length

    def release(self, slot: int) -> None:
        self.rewind(slot, 0)

    def row_kv(self, index: int, row: int) -> np.ndarray:
        """Host copy of one row's cache for ``cache_names()[index]``: [n_head, len, head_dim]
        (validation and tests only; generation never copies the cache)."""
        full = self.past[index].numpy()[row]  # [n_head, columns, head_dim]
        return full[:, np.flatnonzero(self.mask[row])]


def _check_slot(slot: int, batch_size: int) -> None:
    if not 0 <= slot < batch_size:
        raise InvalidParameterError("slot", f"slot {slot} is outside the cache's batch "
                                    f"[0, {batch_size - 1}].")


def _check_rewind(slot: int, length: int, lengths: np.ndarray, batch_size: int) -> None:
    _check_slot(slot, batch_size)
    if not 0 <= length <= int(lengths[slot]):
        raise InvalidParameterError("length", f"slot {slot} holds {int(lengths[slot])} "
                                    f"tokens; rewind to a length in [0, {int(lengths[slot])}], "
                                    f"got {length}.")


def prompt_groups(appends: Sequence[Append], prompts: list[int]) -> list[list[int]]:
    """Prompts into empty slots (indices into ``appends``) in groups that can share one
    right-padded run: adjacent slots, each needing one position's logits (a run returns
    [rows, max keep, vocab], so one scoring row would inflate every other row)."""
    order = sorted(prompts, key=lambda k: appends[k].slot)
    groups: list[list[int]] = []
    start = 0
    while start < len(order):
        end = start + 1
        while (end < len(order) and appends[order[end]].slot == appends[order[end - 1]].slot + 1
               and appends[order[end]].keep <= 1 and appends[order[start]].keep <= 1):
            end += 1
        groups.append(order[start:end])
        start = end
    return groups


def trailing_index(lens: np.ndarray, keeps: Sequence[int], kept: int) -> np.ndarray:
    """[rows, kept] positions of each row's trailing ``keep`` tokens (rows of ``lens``
    tokens); a row keeping fewer repeats its last one."""
    index = np.zeros((len(keeps), kept), np.int64)
    for i, keep in enumerate(keeps):
        index[i] = np.minimum(np.arange(lens[i] - keep, lens[i] - keep + kept),
                              lens[i] - 1).clip(0)
    return index


class FusedCache:
    """Fused layout: one [batch, n_head, max_length, head_dim] buffer per past/present
    pair, allocated once and updated in place by GroupQueryAttention. Each row (slot)
    has its own length, so rows join, decode, verify and leave independently.

    GroupQueryAttention takes one new-token count per run and accepts a past with more
    than one new token only at batch 1, so a step becomes up to three kinds of run:
      * one token per slot: one run over slots [0, last], every slot at its own length
        (a slot not advancing is written only past its length, where nothing is kept);
      * prompts into empty slots: adjacent slots share a right-padded run;
      * several tokens onto a slot with a past: a run of its own.
    """

    supports_slots = True

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, batch_size: int,
                 device: tuple[str, int], cuda_graph: bool = False) -> None:
        m = manifest
        assert m.max_length is not None, "fused manifests always carry max_length"
        self.session = session
        self.manifest = manifest
        self.batch_size = batch_size
        self.capacity = m.max_length
        self.device_type, self.device_id = device
        self.names = cache_names(m.n_layer)
        self.dtype = _NP[m.cache_dtype]
        self.vocab = m.vocab_size
        # Format-1 folders return each row's last position only, as [batch, vocab].
        self.any_logits = m.any_logits
        shape = (batch_size, m.n_head, m.max_length, m.head_dim)
        self.slot_elems = m.n_head * m.max_length * m.head_dim
        self._host_memory: list[np.ndarray] = []  # keeps CPU buffers alive
        self.buffers = [self._alloc(shape, self.dtype) for _ in self.names]
        self.lengths = np.zeros(batch_size, np.int64)  # tokens held by each slot
        self.on_cpu = self.device_type == "cpu"

        # One-token-per-slot IO, allocated once. On the CPU the numpy arrays *are* the
        # bound memory, so writing them is the whole update; on CUDA they are host staging.
        self.ids = np.zeros((batch_size, 1), np.int64)
        self.positions = np.zeros((batch_size, 1), np.int64)
        self.seqlens = np.zeros(batch_size, np.int32)
        self.index = np.zeros((batch_size, 1), np.int64)  # logits at the one new position
        self.total = np.zeros((), np.int32)
        self.logits_host = np.zeros((batch_size, 1, m.vocab_size), np.float32)
        self.next_host = np.zeros((batch_size, 1), np.int64)
        self._ids_v = self._mirror(self.ids)
        self._pos_v = self._mirror(self.positions)
        self._seq_v = self._mirror(self.seqlens)
        self._index_v = self._mirror(self.index)
        # total_sequence_length is read on the host by GroupQueryAttention on every provider.
        self._total_v = ort.OrtValue.ortvalue_from_numpy(self.total)
        self._logits_v = self._mirror(self.logits_host)
        self._next_v = self._mirror(self.next_host)
        if device[0] != "cpu":
            self._index_v.update_inplace(self.index)  # device memory starts undefined

        # CUDA graphs (session built with enable_cuda_graph): one-token runs have static
        # shapes and fixed bound addresses, so each (slot range) captures one graph and
        # replays it; total_sequence_length is pinned at the capacity, since a captured
        # graph keeps the value it saw (seqlens_k, a bound buffer, carries each row's length).
        # Other runs have a new shape every time and run eagerly (id -1).
        self.cuda_graph = cuda_graph
        self._graph_base = next(_graph_ids) * 65_536 if cuda_graph else 0
        self.eager_options = ort.RunOptions()
        if cuda_graph:
            self.eager_options.add_run_config_entry(CUDA_GRAPH_ID, "-1")
        self._bindings: dict[tuple[int, int], tuple[ort.IOBinding, ort.RunOptions]] = {}

    @property
    def supports_slot_copy(self) -> bool:
        """Whether ``copy_slot`` works: numpy owns the buffers on the CPU; onnxruntime's
        Python API has no device-to-device copy for CUDA ones."""
        return self.on_cpu

    def copy_slot(self, src: int, dst: int) -> None:
        """Give slot ``dst`` the cached tokens of slot ``src`` (a prompt prefilled once
        for several rows). About 1 MB per 13 tokens for gpt2, against a prefill run."""
        if not self.on_cpu:
            raise RuntimeError("copy_slot needs CPU cache buffers")
        n = int(self.lengths[src])
        for array in self._host_memory:
            array[dst, :, :n] = array[src, :, :n]
        self.lengths[dst] = n

    def read_tokens(self, slot: int, start: int, end: int, out: np.ndarray) -> None:
        """Copy positions [start, end) of ``slot`` from every cache buffer into ``out``
        ([n_buffers, n_head, end - start, head_dim]): a prefix block for reuse."""
        if not self.on_cpu:
            raise RuntimeError("read_tokens needs CPU cache buffers")
        for j, array in enumerate(self._host_memory):
            out[j] = array[slot, :, start:end]

    def write_tokens(self, slot: int, start: int, block: np.ndarray) -> None:
        """Put a block read by ``read_tokens`` at positions [start, start + its length) of
        ``slot``; the slot then holds exactly that many tokens."""
        if not self.on_cpu:
            raise RuntimeError("write_tokens needs CPU cache buffers")
        end = start + block.shape[2]
        if not 0 <= start <= int(self.lengths[slot]) or end > self.capacity:
            raise ValueError(f"block [{start}, {end}) does not continue slot {slot} "
                             f"(length {int(self.lengths[slot])})")
        for j, array in enumerate(self._host_memory):
            array[slot, :, start:end] = block[j]
        self.lengths[slot] = end

    def block_shape(self, tokens: int) -> tuple[int, ...]:
        m = self.manifest
        return (len(self._host_memory), m.n_head, tokens, m.head_dim)

    def _alloc(self, shape: tuple[int, ...], dtype: type) -> ort.OrtValue:
        if self.device_type == "cpu":
            # numpy owns CPU memory so slot views can be bound by address.
            array = np.zeros(shape, dtype)
            self._host_memory.append(array)
            return ort.OrtValue.ortvalue_from_numpy(array)
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device_type,
                                                         self.device_id)

    def _mirror(self, host: np.ndarray) -> ort.OrtValue:
        if self.device_type == "cpu":
            return ort.OrtValue.ortvalue_from_numpy(host)
        return ort.OrtValue.ortvalue_from_shape_and_type(host.shape, host.dtype,
                                                         self.device_type, self.device_id)

    def reset(self) -> None:
        """Forget every row; the buffers stay allocated."""
        self.lengths[:] = 0

    def rewind(self, slot: int, length: int) -> None:
        """Keep only the first ``length`` tokens of ``slot`` (a rejected draft, a reused
        prefix): setting the length is the whole rewind, the next append overwrites."""
        _check_rewind(slot, length, self.lengths, self.batch_size)
        self.lengths[slot] = length

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    # -- the step -----------------------------------------------------------------------

    def step(self, appends: Sequence[Append]) -> StepResult:
        """Append each ``Append``'s tokens to its slot; returns the logits asked for.
        Slots not named are not advanced and their cached tokens are not written."""
        _check_appends(appends, self.batch_size, self.lengths, self.capacity, self.vocab)
        logits: list[np.ndarray | None] = [None] * len(appends)
        argmax: list[np.ndarray | None] = [None] * len(appends)
        fetch: list | None = None if self.on_cpu else []
        singles = [k for k, a in enumerate(appends) if len(a.tokens) == 1]
        prompts = [k for k, a in enumerate(appends)
                   if len(a.tokens) > 1 and self.lengths[a.slot] == 0]
        continued = [k for k, a in enumerate(appends)
                     if len(a.tokens) > 1 and self.lengths[a.slot] > 0]
        if not self.any_logits:
            for a in appends:
                if a.keep > 1:
                    raise InvalidParameterError("logits", self.manifest.last_position_only(
                        f"logits at {a.keep} positions"))
        # Lengths move only after every run: one-token runs see the slots as they were.
        if singles:
            self._run_singles([appends[k] for k in singles], singles, logits, argmax, fetch)
        for group in prompt_groups(appends, prompts):
            self._run_many([appends[k] for k in group], group, logits, argmax, fetch, past=0)
        for k in continued:
            self._run_many([appends[k]], [k], logits, argmax, fetch,
                           past=int(self.lengths[appends[k].slot]))
        for a in appends:
            self.lengths[a.slot] += len(a.tokens)
        return StepResult(logits, argmax, fetch or None)

    def _run_singles(self, appends: list[Append], where: list[int],
                     logits: list, argmax: list, fetch: list | None) -> None:
        """One token for each of ``appends``' slots; the other slots in the range ride
        along at their own length, written only where nothing is kept. A full slot cannot
        ride (nowhere to write), so the range splits around it."""
        slots = np.array([a.slot for a in appends], np.int64)
        order = np.argsort(slots)
        lengths = self.lengths
        for first, last in self._segments(slots[order]):
            rows = last - first + 1
            view = slice(first, last + 1)
            self.ids[view, 0] = 0
            self.positions[view, 0] = lengths[view]
            self.seqlens[view] = lengths[view]
            for k in order:
                if first <= slots[k] <= last:
                    self.ids[slots[k], 0] = int(appends[k].tokens[0])
            _check_ids(self.ids[view, 0], self.vocab)  # one check for the whole run
            self.total[...] = self.capacity if self.cuda_graph else int(lengths[view].max()) + 1
            if not self.on_cpu:
                self._ids_v.update_inplace(self.ids)
                self._pos_v.update_inplace(self.positions)
                self._seq_v.update_inplace(self.seqlens)
            binding, options = self._single_binding(first, rows)
            self.session.run_with_iobinding(binding, options)
            # Greedy rows need only their ids: on CUDA the [batch, 1] id buffer comes over,
            # a few bytes, and the logits stay on the device unless a row reads them.
            next_ids = self.next_host if self.on_cpu else self._next_v.numpy()
            for k in order:
                s = int(slots[k])
                if first <= s <= last and appends[k].keep:
                    argmax[where[k]] = next_ids[s]
                    if self.on_cpu:
                        logits[where[k]] = self.logits_host[s]
                    else:
                        fetch.append((where[k], self._logits_v, s, 1))

    def _segments(self, slots: np.ndarray) -> list[tuple[int, int]]:
        """Contiguous slot ranges covering ``slots`` (sorted) with no full slot riding."""
        segments: list[tuple[int, int]] = []
        first = prev = int(slots[0])
        asked = set(slots.tolist())
        for s in slots[1:].tolist():
            blocked = any(self.lengths[r] >= self.capacity for r in range(prev + 1, s)
                          if r not in asked)
            if blocked:
                segments.append((first, prev))
                first = s
            prev = s
        segments.append((first, prev))
        return segments

    def _single_binding(self, first: int, rows: int) -> tuple[ort.IOBinding, ort.RunOptions]:
        """The one-token binding over slots [first, first + rows): views of every buffer,
        made once per range and reused (fixed addresses, as CUDA graphs need)."""
        key = (first, rows)
        if key not in self._bindings:
            b = self.session.io_binding()
            dev, dev_id = self.device_type, self.device_id
            b.bind_input(INPUT_IDS, dev, dev_id, np.int64, [rows, 1],
                         self._ids_v.data_ptr() + first * 8)
            b.bind_input(POSITION_IDS, dev, dev_id, np.int64, [rows, 1],
                         self._pos_v.data_ptr() + first * 8)
            b.bind_input(SEQLENS_K, dev, dev_id, np.int32, [rows],
                         self._seq_v.data_ptr() + first * 4)
            b.bind_ortvalue_input(TOTAL_SEQUENCE_LENGTH, self._total_v)
            if self.any_logits:
                b.bind_input(LOGITS_INDEX, dev, dev_id, np.int64, [rows, 1],
                             self._index_v.data_ptr())
            self._bind_slot_views(b, first, rows)
            shape = [rows, 1, self.vocab] if self.any_logits else [rows, self.vocab]
            b.bind_output(LOGITS, dev, dev_id, np.float32, shape,
                          self._logits_v.data_ptr() + first * self.vocab * 4)
            b.bind_output(NEXT_TOKEN, dev, dev_id, np.int64,
                          shape[:-1], self._next_v.data_ptr() + first * 8)
            options = ort.RunOptions()
            if self.cuda_graph:
                # One captured graph per row count from slot 0 (ids unique per cache: its
                # buffers have their own addresses); a range split off by a full slot is
                # rare and runs eagerly rather than capturing a graph per range.
                graph = self._graph_base + rows if first == 0 else -1
                options.add_run_config_entry(CUDA_GRAPH_ID, str(graph))
            self._bindings[key] = (b, options)
        return self._bindings[key]

    def _run_many(self, appends: list[Append], where: list[int], logits: list,
                  argmax: list, fetch: list | None, past: int) -> None:
        """Several tokens per slot into adjacent slots, in one run: empty slots right-padded
        to one length (``past`` 0), or one slot with a past."""
        n = len(appends)
        first = appends[0].slot
        lens = np.array([len(a.tokens) for a in appends], np.int64)
        width = int(lens.max())
        kept = max(1, max(a.keep for a in appends))
        ids = np.zeros((n, width), np.int64)
        for i, a in enumerate(appends):
            ids[i, :lens[i]] = a.tokens
        index = trailing_index(lens, [a.keep for a in appends], kept)
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, ids)
        binding.bind_cpu_input(POSITION_IDS, (past + np.arange(width, dtype=np.int64))
                               [None].repeat(n, axis=0))
        binding.bind_cpu_input(SEQLENS_K, (past + lens - 1).astype(np.int32))
        binding.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, np.array(past + width, np.int32))
        if self.any_logits:
            binding.bind_cpu_input(LOGITS_INDEX, index)
        # Outputs in binding order: logits and ids first, then the cache views.
        binding.bind_output(LOGITS, self.device_type, self.device_id)
        binding.bind_output(NEXT_TOKEN, self.device_type, self.device_id)
        self._bind_slot_views(binding, first, n)
        self.session.run_with_iobinding(binding, self.eager_options)
        out_logits, out_next = binding.get_outputs()[:2]
        next_host = out_next.numpy().reshape(n, -1)  # [n, kept]
        host = out_logits.numpy() if self.on_cpu else None
        for i, (a, k) in enumerate(zip(appends, where, strict=True)):
            if not a.keep:
                continue
            argmax[k] = next_host[i, :a.keep]
            if host is not None:
                logits[k] = host.reshape(n, -1, self.vocab)[i, :a.keep]
            else:
                assert fetch is not None
                fetch.append((k, out_logits, i, a.keep))

    def _bind_slot_views(self, binding: ort.IOBinding, first: int, rows: int) -> None:
        """Bind rows [first, first + rows) of every cache buffer by address: a run writes
        straight into those slots of the big buffers."""
        m = self.manifest
        itemsize = np.dtype(self.dtype).itemsize
        shape = [rows, m.n_head, m.max_length, m.head_dim]
        for (past, present), buf in zip(self.names, self.buffers, strict=True):
            ptr = buf.data_ptr() + first * self.slot_elems * itemsize
            binding.bind_input(past, self.device_type, self.device_id, self.dtype, shape, ptr)
            binding.bind_output(present, self.device_type, self.device_id, self.dtype, shape, ptr)

    def row_kv(self, index: int, row: int) -> np.ndarray:
        """Host copy of one row's cache for ``cache_names()[index]``: [n_head, len, head_dim]
        (validation and tests only; generation never copies the cache)."""
        return self.buffers[index].numpy()[row, :, :int(self.lengths[row])]
