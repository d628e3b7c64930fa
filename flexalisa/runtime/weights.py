"""Weight placement: which layers live on the device, which stream in, and INT4 compression.

Decision (FlexGen places per tensor; we place **by layer**): with ``weights_gpu_share = w`` the
first ``round(w · L)`` decoder layers are resident on the device and the rest stay in host
memory (pinned under CUDA). Whole layers keep the streaming unit simple: a streamed layer is
one copy job, issued one layer ahead (``LOAD_WEIGHT``) into one of two working buffers, so at
most two streamed layers are on the device at a time (double buffering). The globals
(embeddings, final norm, lm_head) are always resident: every step needs them.

``weight_compression = "int4"``: every 2-D matrix of every layer is stored group-wise INT4
(``flexalisa.kv.quant``, groups of 64 along ``in_features``, or the largest even divisor that
fits), resident or not; streamed layers are copied as codes, and every layer is dequantized on
the device at ``LOAD_WEIGHT`` into its working buffer. Biases and norms stay uncompressed.

On a CPU device the two working buffers of uncompressed streamed layers are real, reused
tensors: a load copies into a free one and the loop hands it back (``release``) after the
layer's last compute. A fresh tensor per load (a clone) paid the kernel's first-touch page
faults on every one: a SmolLM2 layer (14 MB, packed) copied at 11.4 GB/s as a clone and at
16.5 GB/s into a reused buffer here. Under CUDA a load allocates from the caching allocator,
which reuses blocks already, and its stream-ordered reuse stays safe without more events.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from flexalisa.kv.quant import QTensor, dequantize, quantize
from flexalisa.models.linear import can_pack, pack_tensor, split_qkv
from flexalisa.models.weights import LayerWeights, ModelWeights
from flexalisa.runtime.device import Device

WEIGHT_GROUP_SIZE = 64  # preferred INT4 group along in_features
StoredTensor = Tensor | QTensor


@dataclass(frozen=True)
class WeightLayout:
    """Where each layer lives; derived from the policy before anything is allocated."""

    num_resident_layers: int  # layers [0, this) live on the device
    num_layers: int  # all decoder layers
    compressed: bool  # INT4 storage of the 2-D matrices

    @classmethod
    def from_share(cls, weights_gpu_share: float, num_layers: int,
                   compressed: bool) -> WeightLayout:
        """Whole layers, rounded down: the device never holds more than the policy's share,
        which is what the cost model's memory terms count."""
        return cls(int(weights_gpu_share * num_layers + 1e-9), num_layers, compressed)

    def resident(self, layer_idx: int) -> bool:
        return layer_idx < self.num_resident_layers

    @property
    def needs_working_buffers(self) -> bool:
        """Whether any layer is materialised on the device per use (streamed or dequantized)."""
        return self.compressed or self.num_resident_layers < self.num_layers


def int4_group_size(in_features: int) -> int:
    """The largest even group <= WEIGHT_GROUP_SIZE dividing ``in_features``."""
    for size in range(WEIGHT_GROUP_SIZE, 1, -2):
        if in_features % size == 0:
            return size
    raise ValueError(f"in_features {in_features} has no even group size for INT4")


def stored_bytes(t: StoredTensor) -> int:
    return t.nbytes if isinstance(t, QTensor) else t.numel() * t.element_size()


def layer_stored_bytes(layer: dict[str, StoredTensor]) -> int:
    return sum(stored_bytes(t) for t in layer.values())


def globals_bytes(g: dict[str, Tensor], device: torch.device, dtype: torch.dtype) -> int:
    """Device bytes of the globals as ``WeightStore`` holds them: tied tensors once, except a
    tied ``lm_head`` that gets its own oneDNN-packed copy (fp32 on CPU)."""
    unique = {id(t): t for t in g.values()}.values()
    total = sum(t.numel() for t in unique)
    if can_pack(device, dtype) and g.get("lm_head") is not None and g["lm_head"] is g.get("embed"):
        total += g["lm_head"].numel()
    return total * torch.empty((), dtype=dtype).element_size()


def compressed_layer_bytes(layer: LayerWeights, dtype: torch.dtype) -> int:
    """Bytes a layer takes stored as INT4 (without building it): for budgets."""
    elt = torch.empty((), dtype=dtype).element_size()
    total = 0
    for t in layer.values():
        if t.dim() == 2:
            groups = t.numel() // int4_group_size(t.shape[1])
            total += t.numel() // 2 + 8 * groups
        else:
            total += t.numel() * elt
    return total


class WeightStore:
    """Home copies of the layers, and ``load(layer_idx)`` giving a device-ready dict.

    ``recompute``: K, V will be recomputed from layer inputs (a recompute tier). Packed layers
    then keep their QKV matrix as ``wq`` and ``wkv`` (``split_qkv``, the same bytes), so that a
    recomputation multiplies the K, V rows only, as the cost model counts it.
    """

    def __init__(self, weights: ModelWeights, layout: WeightLayout, device: Device,
                 dtype: torch.dtype, recompute: bool = False) -> None:
        self.layout, self.device, self.dtype = layout, device, dtype
        compute = device.torch_device
        # fp32 on CPU: uncompressed matrices are used oneDNN-packed (flexalisa.models.linear)
        self.packed = can_pack(compute, dtype)
        split = recompute and self.packed and not layout.compressed
        self.q_dim = weights.spec.q_dim if split else None  # where wqkv is split, if it is
        self.globals = {k: v.to(compute, dtype if v.is_floating_point() else None)
                        for k, v in weights.globals.items()}
        if "lm_head" in weights.globals and weights.globals["lm_head"] is weights.globals.get(
                "embed"):
            self.globals["lm_head"] = self.globals["embed"]  # keep tied tensors tied
        if self.packed:
            self.globals = {k: pack_tensor(k, v) for k, v in self.globals.items()}
        self.layers: list[dict[str, StoredTensor]] = [
            self._home(layer, layout.resident(j)) for j, layer in enumerate(weights.layers)]
        # reused working buffers (CPU device, see the module docstring): slot -> name -> tensor
        self.reuse_buffers = compute.type == "cpu"
        self._buffers: list[dict[str, Tensor]] = [{}, {}]
        self._free_slots = [0, 1]
        self._slot_of: dict[int, int] = {}  # id(loaded layer dict) -> its slot
        self._slots_lock = threading.Lock()  # loads run on a copy thread, releases on compute

    def _home(self, layer: LayerWeights, resident: bool) -> dict[str, StoredTensor]:
        if self.q_dim is not None and "wqkv" in layer:
            layer = split_qkv(layer, self.q_dim)
        out: dict[str, StoredTensor] = {}
        for name, t in layer.items():
            t = t.to(self.dtype)
            if self.layout.compressed and t.dim() == 2:
                q = quantize(t, 4, int4_group_size(t.shape[1]))
                out[name] = q.to(self.device.torch_device) if resident else _host_q(q, self.device)
            elif resident or self.packed:  # packed (CPU only): a streamed layer's host copy
                t = t.to(self.device.torch_device)  # is packed too, and a load clones it
                out[name] = pack_tensor(name, t) if self.packed else t
            else:
                out[name] = (t if t.device.type == "cpu" and not self.device.pin
                             else self.device.to_host(t))
        return out

    def is_streamed(self, layer_idx: int) -> bool:
        """Whether ``load`` copies this layer host → device."""
        return not self.layout.resident(layer_idx)

    def load(self, layer_idx: int) -> tuple[LayerWeights, int]:
        """The layer's weights on the device, and the bytes copied host → device.

        Runs as a copy job. A resident uncompressed layer is returned as is (nothing copied).
        """
        home = self.layers[layer_idx]
        if not self.layout.needs_working_buffers or (self.layout.resident(layer_idx)
                                                     and not self.layout.compressed):
            return home, 0  # type: ignore[return-value]
        streamed = self.is_streamed(layer_idx)
        slot = self._take_slot() if streamed and not self.layout.compressed else None
        out: LayerWeights = {}
        if slot is not None:
            with self._slots_lock:
                self._slot_of[id(out)] = slot
        moved = 0
        try:
            for name, t in home.items():
                if isinstance(t, QTensor):
                    on_device = t.to(self.device.torch_device, non_blocking=self.device.pin)
                    out[name] = dequantize(on_device)
                elif not streamed:
                    out[name] = t
                elif slot is not None:
                    out[name] = self._fill(slot, name, t)
                else:
                    out[name] = self.device.to_compute(t)
                moved += stored_bytes(t) if streamed else 0
        except BaseException:
            self.release(out)  # a failed load hands its buffer back
            raise
        return out, moved

    def release(self, layer: LayerWeights) -> None:
        """``layer`` (a ``load`` result) is no longer read: its working buffer may be reused."""
        with self._slots_lock:
            slot = self._slot_of.pop(id(layer), None)
            if slot is not None:
                self._free_slots.append(slot)

    def _take_slot(self) -> int | None:
        """A free reusable buffer, or None (not a CPU device, or both in use): then the load
        makes a fresh copy, as under CUDA."""
        if not self.reuse_buffers:
            return None
        with self._slots_lock:
            return self._free_slots.pop(0) if self._free_slots else None

    def _fill(self, slot: int, name: str, t: Tensor) -> Tensor:
        """``t`` copied into the slot's tensor for ``name``; a new one (kept for the next load)
        when the slot has none that matches ``t``."""
        buf = self._buffers[slot].get(name)
        if (buf is None or buf.size() != t.size() or buf.dtype != t.dtype
                or buf.is_mkldnn != t.is_mkldnn):
            self._buffers[slot][name] = self.device.to_compute(t)
            return self._buffers[slot][name]
        return buf.copy_(t)

    def resident_bytes(self) -> int:
        """Device bytes of the globals and the resident layers."""
        seen: set[int] = set()
        total = 0
        for t in self.globals.values():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total + sum(layer_stored_bytes(self.layers[j])
                           for j in range(self.layout.num_resident_layers))

    def host_bytes(self) -> int:
        return sum(layer_stored_bytes(self.layers[j])
                   for j in range(self.layout.num_resident_layers, self.layout.num_layers))


def _host_q(q: QTensor, device: Device) -> QTensor:
    return QTensor(device.to_host(q.codes), device.to_host(q.scale), device.to_host(q.minimum),
                   q.bits, q.group_size, q.dtype)
