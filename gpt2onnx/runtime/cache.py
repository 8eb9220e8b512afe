"""The KV cache's one owner per layout: device buffers, the IOBinding, and one model step.

Both classes expose the same two verbs to the decode loop:
``prefill(rows) -> logits [rows, vocab]`` and ``decode(tokens) -> logits [batch, vocab]``.
Only the last position's logits reach the host; the cache never does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from gpt2onnx.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    NEXT_TOKEN,
    POSITION_IDS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    Manifest,
    cache_names,
)
from gpt2onnx.errors import PromptTooLongError

_NP = {"float32": np.float32, "float16": np.float16}
CUDA_GRAPH_ID = "gpu_graph_id"  # onnxruntime run option: which captured CUDA graph to use


class StandardCache:
    """Standard layout: present = concat(past, new) is a fresh device buffer each step;
    it is bound, as the same OrtValue, as the next step's past. Rows are left-padded and
    masked, as transformers does for batched generation."""

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
        self.past: list[ort.OrtValue] = []
        self.mask = np.zeros((batch_size, 0), np.int64)  # [batch, total]
        self.next_pos = np.zeros(batch_size, np.int64)
        self.lengths = np.zeros(batch_size, np.int64)  # cache length per row, pads included

    def reset(self) -> None:
        """Nothing to keep between generations: each prefill starts a new cache."""

    def _empty_past(self, rows: int) -> list[ort.OrtValue]:
        m = self.manifest
        shape = (rows, m.n_head, 0, m.head_dim)
        dtype = _NP[m.cache_dtype]
        return [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device_type,
                                                          self.device_id) for _ in self.names]

    def _run(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        b = self.binding
        b.bind_cpu_input(INPUT_IDS, ids)
        b.bind_cpu_input(ATTENTION_MASK, self.mask)
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
        return outputs[0].numpy()[:, -1, :]  # [batch, vocab]

    def prefill(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Run the prompts (left-padded to one length); return each row's last logits."""
        longest = max(len(r) for r in rows)
        if longest > self.capacity:
            raise PromptTooLongError("prompt", f"prompt has {longest} tokens; the context holds "
                                     f"{self.capacity}. Shorten it.")
        ids = np.full((len(rows), longest), self.pad_id, np.int64)
        self.mask = np.zeros((len(rows), longest), np.int64)
        for i, r in enumerate(rows):
            ids[i, longest - len(r):] = r
            self.mask[i, longest - len(r):] = 1
        positions = np.clip(np.cumsum(self.mask, axis=1) - 1, 0, None)
        self.next_pos = self.mask.sum(axis=1)
        self.lengths = np.full(len(rows), longest, np.int64)
        self.past = self._empty_past(len(rows))
        return self._run(ids, positions)

    def row_kv(self, index: int, row: int) -> np.ndarray:
        """Host copy of one row's cache for ``cache_names()[index]``: [n_head, len, head_dim]
        (validation and tests only; generation never copies the cache)."""
        full = self.past[index].numpy()[row]  # [n_head, total, head_dim], left-padded
        return full[:, full.shape[1] - int(self.mask[row].sum()):]

    def decode(self, tokens: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        """One token per row ([batch] int64); returns [batch, vocab] logits."""
        del active  # rows cannot leave a standard-layout batch: the cache is one tensor
        rows = tokens.shape[0]
        self.mask = np.concatenate([self.mask, np.ones((rows, 1), np.int64)], axis=1)
        logits = self._run(tokens.reshape(rows, 1), self.next_pos.reshape(rows, 1))
        self.next_pos += 1
        self.lengths += 1
        return logits


class FusedCache:
    """Fused layout: one [batch, n_head, max_length, head_dim] buffer per past/present
    pair, allocated once and updated in place by GroupQueryAttention. Each row (slot)
    has its own length, so rows join, decode and leave independently."""

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
        shape = (batch_size, m.n_head, m.max_length, m.head_dim)
        self.slot_elems = m.n_head * m.max_length * m.head_dim
        self._host_memory: list[np.ndarray] = []  # keeps CPU buffers alive
        self.buffers = [self._alloc(shape, self.dtype) for _ in self.names]
        self.lengths = np.zeros(batch_size, np.int64)  # tokens held by each slot
        self._step_lengths = np.zeros(batch_size, np.int64)  # decode scratch: active lengths

        # Decode-step IO, allocated once. On the CPU the numpy arrays *are* the bound
        # memory, so writing them is the whole update; on CUDA they are host staging.
        self.ids = np.zeros((batch_size, 1), np.int64)
        self.positions = np.zeros((batch_size, 1), np.int64)
        self.seqlens = np.zeros(batch_size, np.int32)
        self.total = np.zeros((), np.int32)
        self.logits_host = np.zeros((batch_size, m.vocab_size), np.float32)
        self.next_host = np.zeros(batch_size, np.int64)
        self._ids_v = self._mirror(self.ids)
        self._pos_v = self._mirror(self.positions)
        self._seq_v = self._mirror(self.seqlens)
        # total_sequence_length is read on the host by GroupQueryAttention on every provider.
        self._total_v = ort.OrtValue.ortvalue_from_numpy(self.total)
        self._logits_v = self._mirror(self.logits_host)
        self._next_v = self._mirror(self.next_host)

        self.decode_binding = session.io_binding()
        b = self.decode_binding
        b.bind_ortvalue_input(INPUT_IDS, self._ids_v)
        b.bind_ortvalue_input(POSITION_IDS, self._pos_v)
        b.bind_ortvalue_input(SEQLENS_K, self._seq_v)
        b.bind_ortvalue_input(TOTAL_SEQUENCE_LENGTH, self._total_v)
        for (past, present), buf in zip(self.names, self.buffers, strict=True):
            b.bind_ortvalue_input(past, buf)
            b.bind_ortvalue_output(present, buf)  # same OrtValue: updated in place
        b.bind_ortvalue_output(LOGITS, self._logits_v)
        b.bind_ortvalue_output(NEXT_TOKEN, self._next_v)
        self.on_cpu = self.device_type == "cpu"

        # CUDA graphs (session built with enable_cuda_graph): decode steps have static
        # shapes and fixed bound addresses, so each batch size captures one graph and
        # replays it; a prefill has a new shape every time and runs eagerly (id -1).
        self.decode_options = ort.RunOptions()
        self.prefill_options = ort.RunOptions()
        self._prefix_bindings: dict[int, tuple[ort.IOBinding, ort.RunOptions]] = {}
        self.cuda_graph = cuda_graph
        if cuda_graph:
            self.decode_options.add_run_config_entry(CUDA_GRAPH_ID, str(batch_size))
            self.prefill_options.add_run_config_entry(CUDA_GRAPH_ID, "-1")

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
        """Forget every row; the buffers stay allocated for the next generation."""
        self.lengths[:] = 0

    def _bind_slot_views(self, binding: ort.IOBinding, first: int, rows: int) -> None:
        """Bind rows [first, first + rows) of every cache buffer (and of logits/next
        token) by address: a prefill writes straight into those slots of the big buffers."""
        m = self.manifest
        itemsize = np.dtype(self.dtype).itemsize
        shape = [rows, m.n_head, m.max_length, m.head_dim]
        for (past, present), buf in zip(self.names, self.buffers, strict=True):
            ptr = buf.data_ptr() + first * self.slot_elems * itemsize
            binding.bind_input(past, self.device_type, self.device_id, self.dtype, shape, ptr)
            binding.bind_output(present, self.device_type, self.device_id, self.dtype, shape, ptr)
        binding.bind_output(LOGITS, self.device_type, self.device_id, np.float32,
                            [rows, m.vocab_size],
                            self._logits_v.data_ptr() + first * m.vocab_size * 4)
        binding.bind_output(NEXT_TOKEN, self.device_type, self.device_id, np.int64, [rows],
                            self._next_v.data_ptr() + first * 8)

    def prefill(self, rows: Sequence[Sequence[int]], first_slot: int = 0) -> np.ndarray:
        """Run prompts into slots [first_slot, first_slot + len(rows)), right-padded to one
        length; each slot's length becomes its prompt's. Returns [rows, vocab] logits."""
        n, longest = len(rows), max(len(r) for r in rows)
        if longest > self.capacity:
            raise PromptTooLongError("prompt", f"prompt has {longest} tokens; the cache holds "
                                     f"{self.capacity}. Shorten it.")
        if first_slot < 0 or first_slot + n > self.batch_size:
            raise ValueError(f"slots [{first_slot}, {first_slot + n}) outside the cache's "
                             f"batch of {self.batch_size}")
        ids = np.zeros((n, longest), np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        lens = np.array([len(r) for r in rows], np.int64)
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, ids)
        binding.bind_cpu_input(POSITION_IDS, np.broadcast_to(np.arange(longest), (n, longest))
                               .astype(np.int64))
        binding.bind_cpu_input(SEQLENS_K, (lens - 1).astype(np.int32))
        binding.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, np.array(longest, np.int32))
        self._bind_slot_views(binding, first_slot, n)
        self.session.run_with_iobinding(binding, self.prefill_options)
        self.lengths[first_slot:first_slot + n] = lens
        return self.last_logits()[first_slot:first_slot + n]

    def decode(self, tokens: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        """Append one token to each active row ([batch] int64); returns [batch, vocab].

        Inactive rows (free or finished slots) ride along at length 0 and are not advanced.
        """
        # Written into the preallocated (bound) arrays with out=: no numpy temporaries per
        # step. Inactive rows get length 0 and token 0.
        lengths = self._step_lengths  # [batch]
        if active is None:
            lengths[:] = self.lengths
            self.ids[:, 0] = tokens
        else:
            np.multiply(self.lengths, active, out=lengths)
            np.multiply(tokens, active, out=self.ids[:, 0])
        longest = int(lengths.max())
        if longest >= self.capacity:
            raise PromptTooLongError("max_new_tokens", f"a row reached the cache's capacity of "
                                     f"{self.capacity} tokens; ask for fewer new tokens.")
        self.positions[:, 0] = lengths
        self.seqlens[:] = lengths
        self.total[...] = longest + 1
        if not self.on_cpu:
            self._ids_v.update_inplace(self.ids)
            self._pos_v.update_inplace(self.positions)
            self._seq_v.update_inplace(self.seqlens)
        # Rows past the last active slot are not run at all: a lone request on a big cache,
        # or a batch whose tail rows finished, pays only for the rows up to the last one
        # still going (the generator and the server fill the lowest free slots first).
        rows = self.batch_size if active is None else int(np.flatnonzero(active)[-1]) + 1
        binding, options = self._decode_binding(rows)
        self.session.run_with_iobinding(binding, options)
        self.lengths += 1 if active is None else active
        return self.last_logits()

    def _decode_binding(self, rows: int) -> tuple[ort.IOBinding, ort.RunOptions]:
        """The decode binding over slots [0, rows): the full one, or a prefix view of every
        buffer, made once per row count and reused (fixed addresses, as CUDA graphs need)."""
        if rows == self.batch_size:
            return self.decode_binding, self.decode_options
        if rows not in self._prefix_bindings:
            b = self.session.io_binding()
            dev, dev_id = self.device_type, self.device_id
            b.bind_input(INPUT_IDS, dev, dev_id, np.int64, [rows, 1], self._ids_v.data_ptr())
            b.bind_input(POSITION_IDS, dev, dev_id, np.int64, [rows, 1], self._pos_v.data_ptr())
            b.bind_input(SEQLENS_K, dev, dev_id, np.int32, [rows], self._seq_v.data_ptr())
            b.bind_ortvalue_input(TOTAL_SEQUENCE_LENGTH, self._total_v)
            self._bind_slot_views(b, 0, rows)
            options = ort.RunOptions()
            if self.cuda_graph:
                # A graph per (batch size, row count): ids must be unique per session.
                options.add_run_config_entry(CUDA_GRAPH_ID, str(self.batch_size * 4096 + rows))
            self._prefix_bindings[rows] = (b, options)
        return self._prefix_bindings[rows]

    def row_kv(self, index: int, row: int) -> np.ndarray:
        """Host copy of one row's cache for ``cache_names()[index]``: [n_head, len, head_dim]
        (validation and tests only; generation never copies the cache)."""
        return self.buffers[index].numpy()[row, :, :int(self.lengths[row])]

    def last_logits(self) -> np.ndarray:
        """[batch, vocab] fp32 on the host (a copy from the device only on CUDA)."""
        if self.on_cpu:
            return self.logits_host
        return self._logits_v.numpy()

    def greedy_tokens(self) -> np.ndarray:
        """[batch] argmax of the last step, computed on the device."""
        if self.on_cpu:
            return self.next_host
        return self._next_v.numpy()
