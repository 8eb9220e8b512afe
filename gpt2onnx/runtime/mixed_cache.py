"""The fused cache driven through the mixed graph: one-token rows and a prompt chunk in
one model run.

With the plain fused graph a step of decode rows plus a prompt chunk is two runs, and
each run is a pass over all the weights. The mixed graph (``contract.MIXED_GRAPH_FILE``)
takes both in one run on one token axis: lane 1 is a range of slots with one token each
(as the plain one-token run), lane 2 either adjacent empty slots with right-padded
prompts or one slot with several tokens onto its past. Both lanes are views of the same
cache buffers, bound by address, and GroupQueryAttention writes each in place.

A lane cannot be empty (GroupQueryAttention rejects zero tokens), so:
  * a step of one-token rows only gives its highest slot to lane 2;
  * a lane with nothing to run gets one dummy token on a one-position scratch cache,
    never on a real slot;
  * a second chunk in the same step runs with a dummy lane 1.
A slot in lane 1's range that lane 2 extends rides lane 1 with its dummy token written
just past the chunk's end, where nothing is kept; where that position would be past the
capacity, the two lanes run apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from gpt2onnx.contract import (
    INPUT_IDS,
    LOGITS,
    LOGITS_INDEX,
    NEXT_TOKEN,
    POSITION_IDS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    Manifest,
    chunk_name,
)
from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.runtime.cache import (
    Append,
    FusedCache,
    StepResult,
    _check_appends,
    prompt_groups,
    trailing_index,
)

Lane = tuple[int, int, list[int]]  # lane 1: first slot, last slot, appends in it
_DECODE_BINDINGS = 16  # decode-step bindings kept (one per slot range seen recently)


class MixedFusedCache(FusedCache):
    """A ``FusedCache`` whose session runs the mixed graph (CPU only): the same verb,
    ``step(appends)``, and the same results, in fewer runs."""

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, batch_size: int,
                 device: tuple[str, int]) -> None:
        if device[0] != "cpu":
            raise InvalidParameterError("provider", "the mixed graph runs on the CPU only; "
                                        "load the folder without mixed=True for CUDA.")
        super().__init__(session, manifest, batch_size, device)
        m = manifest
        # One position per layer and kind: where a dummy token of an empty lane goes.
        self._scratch = [np.zeros((1, m.n_head, 1, m.head_dim), self.dtype) for _ in self.names]
        self.runs = 0  # model runs so far (tests and metrics)
        self._decode_ios: dict[tuple[int, int, int], _DecodeIO] = {}

    def step(self, appends: Sequence[Append]) -> StepResult:
        _check_appends(appends, self.batch_size, self.lengths, self.capacity, self.vocab)
        lengths = self.lengths
        singles = [k for k, a in enumerate(appends) if len(a.tokens) == 1]
        prompts = [k for k, a in enumerate(appends)
                   if len(a.tokens) > 1 and lengths[a.slot] == 0]
        groups = prompt_groups(appends, prompts)
        groups += [[k] for k, a in enumerate(appends)
                   if len(a.tokens) > 1 and lengths[a.slot] > 0]
        if singles and not groups:
            fast = self._decode_step(appends, singles)
            if fast is not None:
                return fast
        lanes: list[Lane] = []
        if singles:
            slots = np.array([appends[k].slot for k in singles], np.int64)
            order = np.argsort(slots)
            if not groups:
                # Lane 2 takes the highest slot's token: no dummy token in the run.
                groups.append([singles[int(order[-1])]])
                order = order[:-1]
            if order.size:
                sorted_slots = slots[order]
                for first, last in self._segments(sorted_slots):
                    inside = [singles[int(i)] for i in order
                              if first <= slots[int(i)] <= last]
                    lanes.append((first, last, inside))
        runs: list[tuple[Lane | None, list[int] | None]] = []
        for i in range(max(len(lanes), len(groups))):
            lane = lanes[i] if i < len(lanes) else None
            group = groups[i] if i < len(groups) else None
            if lane is not None and group is not None and not self._can_share(
                    appends, lane, group):
                runs += [(lane, None), (None, group)]
            else:
                runs.append((lane, group))
        logits: list[np.ndarray | None] = [None] * len(appends)
        argmax: list[np.ndarray | None] = [None] * len(appends)
        for lane, group in runs:  # lengths move only after every run
            self._run(appends, lane, group, logits, argmax)
        for a in appends:
            lengths[a.slot] += len(a.tokens)
        return StepResult(logits, argmax)

    def _decode_step(self, appends: Sequence[Append], singles: list[int]) -> StepResult | None:
        """A step of one-token rows only, the serving loop's usual step: lane 1 takes all
        but the highest slot, lane 2 that one, on IO made once per slot range and reused
        (no allocation, fixed addresses). None where a full slot splits the range."""
        by_slot = sorted(singles, key=lambda k: appends[k].slot)
        top = appends[by_slot[-1]].slot
        rest = [appends[k].slot for k in by_slot[:-1]]
        first, last = (rest[0], rest[-1]) if rest else (-1, -1)
        if rest and len(self._segments(np.array(rest, np.int64))) > 1:
            return None
        io = self._decode_io(first, last, top)
        lengths = self.lengths
        if rest:
            view = slice(first, last + 1)
            io.ids[0, :-1] = 0
            io.positions[0, :-1] = lengths[view]
            io.seqlens[:] = lengths[view]
            io.total[...] = int(lengths[view].max()) + 1
        for k in by_slot[:-1]:
            io.ids[0, appends[k].slot - first] = int(appends[k].tokens[0])
        io.ids[0, -1] = int(appends[by_slot[-1]].tokens[0])
        io.positions[0, -1] = io.chunk_seqlens[0] = lengths[top]
        io.chunk_total[...] = int(lengths[top]) + 1
        self.session.run_with_iobinding(io.binding, self.eager_options)
        self.runs += 1
        logits: list[np.ndarray | None] = [None] * len(appends)
        argmax: list[np.ndarray | None] = [None] * len(appends)
        rows = io.ids.shape[1] - 1
        for k in by_slot:
            if appends[k].keep:
                at = rows if appends[k].slot == top else appends[k].slot - first
                logits[k] = io.logits[0, at:at + 1]
                argmax[k] = io.next_ids[0, at:at + 1]
        for k in singles:
            lengths[appends[k].slot] += 1
        return StepResult(logits, argmax)

    def _decode_io(self, first: int, last: int, top: int) -> _DecodeIO:
        key = (first, last, top)
        io = self._decode_ios.pop(key, None)
        if io is None:
            io = _DecodeIO(self, first, last, top)
        self._decode_ios[key] = io  # most recently used last
        while len(self._decode_ios) > _DECODE_BINDINGS:
            del self._decode_ios[next(iter(self._decode_ios))]
        return io

    def _can_share(self, appends: Sequence[Append], lane: Lane, group: list[int]) -> bool:
        """Whether every lane-2 slot inside lane 1's range has room for lane 1's dummy
        token just past its chunk."""
        first, last, _ = lane
        for k in group:
            a = appends[k]
            if first <= a.slot <= last and \
                    int(self.lengths[a.slot]) + len(a.tokens) >= self.capacity:
                return False
        return True

    def _run(self, appends: Sequence[Append], lane: Lane | None, group: list[int] | None,
             logits: list, argmax: list) -> None:
        lengths = self.lengths
        # Lane 1: one token per slot of [first, last]; slots not advancing ride along.
        if lane is not None:
            first, last, inside = lane
            rows = last - first + 1
            ids1 = np.zeros(rows, np.int64)
            seq1 = lengths[first:last + 1].astype(np.int32)
            for k in inside:
                ids1[appends[k].slot - first] = int(appends[k].tokens[0])
        else:
            first, rows, inside = -1, 1, []
            ids1 = np.zeros(1, np.int64)
            seq1 = np.zeros(1, np.int32)
        # Lane 2: right-padded prompts into adjacent empty slots, or one slot's tokens.
        if group is not None:
            chunk = [appends[k] for k in group]
            first2 = chunk[0].slot
            past = int(lengths[first2])
            lens = np.array([len(a.tokens) for a in chunk], np.int64)
            width = int(lens.max())
            ids2 = np.zeros((len(chunk), width), np.int64)
            for i, a in enumerate(chunk):
                ids2[i, :lens[i]] = a.tokens
                if lane is not None and first <= a.slot <= first + rows - 1:
                    seq1[a.slot - first] = past + lens[i]  # ride just past the chunk
            seq2 = (past + lens - 1).astype(np.int32)
            kept = max(1, max(a.keep for a in chunk))
            index2 = trailing_index(lens, [a.keep for a in chunk], kept)
        else:
            chunk, first2, past, width = [], -1, 0, 1
            lens = np.ones(1, np.int64)
            ids2 = np.zeros((1, 1), np.int64)
            seq2 = np.zeros(1, np.int32)
            kept, index2 = 0, np.zeros((1, 0), np.int64)
        # The one token axis: lane 1's rows, then lane 2's rows of ``width``.
        positions = np.concatenate([seq1.astype(np.int64),
                                    (past + np.arange(width, dtype=np.int64))[None]
                                    .repeat(ids2.shape[0], axis=0).ravel()])
        wanted: list[int] = []  # positions on that axis whose logits come back
        where: list[tuple[int, int, int]] = []  # (append, first wanted, count)
        for k in inside:
            if appends[k].keep:
                where.append((k, len(wanted), 1))
                wanted.append(appends[k].slot - first)
        for i, k in enumerate(group or []):
            keep = appends[k].keep
            if keep:
                where.append((k, len(wanted), keep))
                wanted += (rows + i * width + index2[i, :keep]).tolist()
        if not wanted:
            wanted = [0]
        b = self.session.io_binding()
        b.bind_cpu_input(INPUT_IDS, np.concatenate([ids1, ids2.ravel()])[None])
        b.bind_cpu_input(POSITION_IDS, positions[None])
        b.bind_cpu_input(SEQLENS_K, seq1)
        b.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, np.array(int(seq1.max()) + 1, np.int32))
        b.bind_cpu_input(chunk_name(SEQLENS_K), seq2)
        b.bind_cpu_input(chunk_name(TOTAL_SEQUENCE_LENGTH), np.array(past + width, np.int32))
        b.bind_cpu_input(LOGITS_INDEX, np.array([wanted], np.int64))
        b.bind_output(LOGITS, "cpu")
        b.bind_output(NEXT_TOKEN, "cpu")
        self._bind_lane(b, "", first, rows)
        self._bind_lane(b, chunk_name(""), first2, ids2.shape[0])
        self.session.run_with_iobinding(b, self.eager_options)
        self.runs += 1
        out_logits, out_next = b.get_outputs()[:2]
        host = out_logits.numpy()[0]  # [wanted, vocab]
        ids = out_next.numpy()[0]
        for k, start, count in where:
            logits[k] = host[start:start + count]
            argmax[k] = ids[start:start + count]

    def _bind_lane(self, b: ort.IOBinding, prefix: str, first: int, rows: int) -> None:
        """Lane views of every cache buffer at slots [first, first + rows), or the scratch
        position (``first`` -1)."""
        m = self.manifest
        itemsize = np.dtype(self.dtype).itemsize
        length = m.max_length if first >= 0 else 1
        shape = [rows, m.n_head, length, m.head_dim]
        arrays = self._host_memory if first >= 0 else self._scratch
        for (past, present), array in zip(self.names, arrays, strict=True):
            ptr = array.ctypes.data + max(first, 0) * self.slot_elems * itemsize
            b.bind_input(prefix + past, "cpu", 0, self.dtype, shape, ptr)
            b.bind_output(prefix + present, "cpu", 0, self.dtype, shape, ptr)


class _DecodeIO:
    """The IO of a decode-only step over lane-1 slots [first, last] (none: -1) and lane-2
    slot ``top``: numpy arrays that are the bound memory, and the binding over them."""

    def __init__(self, cache: MixedFusedCache, first: int, last: int, top: int) -> None:
        rows = last - first + 1 if first >= 0 else 1
        tokens = rows + 1
        self.ids = np.zeros((1, tokens), np.int64)
        self.positions = np.zeros((1, tokens), np.int64)
        self.seqlens = np.zeros(rows, np.int32)
        self.total = np.ones((), np.int32)
        self.chunk_seqlens = np.zeros(1, np.int32)
        self.chunk_total = np.ones((), np.int32)
        self.index = np.arange(tokens, dtype=np.int64)[None]
        self.logits = np.zeros((1, tokens, cache.vocab), np.float32)
        self.next_ids = np.zeros((1, tokens), np.int64)
        b = cache.session.io_binding()
        for name, array in ((INPUT_IDS, self.ids), (POSITION_IDS, self.positions),
                            (SEQLENS_K, self.seqlens), (TOTAL_SEQUENCE_LENGTH, self.total),
                            (chunk_name(SEQLENS_K), self.chunk_seqlens),
                            (chunk_name(TOTAL_SEQUENCE_LENGTH), self.chunk_total),
                            (LOGITS_INDEX, self.index)):
            b.bind_ortvalue_input(name, _value(array))
        b.bind_ortvalue_output(LOGITS, _value(self.logits))
        b.bind_ortvalue_output(NEXT_TOKEN, _value(self.next_ids))
        cache._bind_lane(b, "", first, rows)
        cache._bind_lane(b, chunk_name(""), top, 1)
        self.binding = b


def _value(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue over ``array``'s own memory (writing the array updates the input)."""
    return ort.OrtValue.ortvalue_from_numpy(array)
