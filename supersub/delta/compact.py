"""A stored delta held for serving in about its stored bytes, decoded per routed group.

The predictor keeps every specialist's delta on its device in the form below and decodes one
just before the group of images routed to it runs, straight into the resident's weights and back
out again. N specialists then cost the resident network plus about their stored bytes, not the
resident plus N decoded copies (int64 positions + fp32 values, 12 bytes an entry: at 5 % keep a
decoded delta of every stage of a ResNet-50 is ~0.15 networks; its stored form ~0.03).

* :class:`FlatLayout` — the resident's conv weights that deltas change, moved into one flat
  buffer (each module's weight a view of it, values unchanged), so that putting a whole delta
  on and taking it off is one gather and two scatters at positions of the buffer, however many
  layers it spans (53 convs on a ResNet-50: three kernels in all, not a few per layer).
* :class:`CompactDelta` — one delta over a layout: the positions as one stream of gaps, one
  byte a gap (the stored LEB128 varints are one byte a gap below 128; a gap over 255, rare at
  keep >= 1 %, goes to a short exception list), the b-bit codes as one packed stream, the
  per-output-channel scales with each channel's number of kept entries (2 bytes a channel:
  what turns the scales into one per entry without a loop over layers), BatchNorm tensors and
  head. :meth:`CompactDelta.decode` is a dozen tensor ops on the device.
* :class:`DecodedDelta` — positions (int64: what the scatter kernels index with; an int32 index
  is converted to int64 inside them anyway) and fp32 values at positions of the layout; the
  values are :func:`supersub.delta.materialize`'s bit for bit (the same ``q * s`` in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from supersub.delta.format import PackedDelta
from supersub.delta.packing import (
    layer_positions,
    pack_codes,
    symmetric_qrange,
    unpack_codes,
)
from supersub.delta.tuner import BN_TENSORS

# Elements between two weights' starts in the flat buffer are a multiple of this: 512 bytes of
# fp32, the CUDA caching allocator's own alignment, so a kernel sees each weight aligned as if
# it had been allocated on its own.
ALIGN = 128
# A gap that does not fit in one byte is kept in the exception list.
_GAP_MAX = 255


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class FlatLayout:
    """The conv weights ``names`` of ``model`` (on its device) moved into one flat buffer.

    Each module's ``weight`` becomes a view of :attr:`buffer` with the same values, so the
    model computes exactly as before; ``slots[name]`` is ``(offset, shape)``. Weights are laid
    out in module order. A model already laid out so (a second predictor on the same network)
    keeps its buffer, which both then patch, as they patched the same weights before."""

    def __init__(self, model: nn.Module, names) -> None:
        modules = dict(model.named_modules())
        wanted = set(names)
        unknown = sorted(wanted - set(modules))
        if unknown:
            raise ValueError(f"no module(s) {unknown} in the resident network")
        self.slots: dict[str, tuple[int, tuple[int, ...]]] = {}
        total, used = 0, 0
        for name, m in model.named_modules():
            if name not in wanted:
                continue
            w = m.weight
            if not w.is_contiguous():
                raise ValueError(f"{name}.weight is not contiguous; a delta indexes its flat entries")
            total = -(-total // ALIGN) * ALIGN
            self.slots[name] = (total, tuple(w.shape))
            total += w.numel()
            used += w.numel()
        self._modules = [(modules[n], off) for n, (off, _) in self.slots.items()]
        ref = self._modules[0][0].weight if self._modules else torch.zeros(0)
        self.padding_bytes = (total - used) * ref.element_size()
        storage = ref.untyped_storage()
        if self._modules and storage.nbytes() >= total * ref.element_size() and all(
                m.weight.untyped_storage().data_ptr() == storage.data_ptr() and m.weight.storage_offset() == off
                for m, off in self._modules):
            self.buffer = ref.new_empty(0).set_(storage, 0, (total,))
            return
        # Filled weight by weight, each old weight freed as its copy lands: on a CPU the pages of an
        # empty() buffer are only committed when written, so this never holds the weights twice.
        self.buffer = torch.empty(total, dtype=ref.dtype, device=ref.device)
        end = 0
        with torch.no_grad():
            for m, off in self._modules:
                self.buffer[end:off].zero_()
                end = off + m.weight.numel()
                view = self.buffer[off:end].view(m.weight.shape)
                view.copy_(m.weight.detach())
                m.weight.data = view

    @property
    def numel(self) -> int:
        return self.buffer.numel()

    def check(self) -> None:
        """Raises when a module's weight is no longer this buffer's view (something laid the same
        network out again for other weights, or replaced a weight): a delta scattered into the
        buffer would then not reach the network."""
        base, size = self.buffer.data_ptr(), self.buffer.element_size()
        for m, off in self._modules:
            if m.weight.data_ptr() != base + off * size:
                raise RuntimeError("the resident network's weights were moved out of this predictor's flat buffer "
                                   "(another predictor built on the same network with other delta layers?); "
                                   "give each predictor its own copy of the network")


@dataclass(eq=False)  # holds tensors: identity, not value, equality
class DecodedDelta:
    """A delta decoded for a :class:`FlatLayout`: the buffer's ``positions`` (int64, sorted) get
    ``values`` (fp32) added; ``bn`` and ``head`` are the specialist's (shared with its
    :class:`CompactDelta`, so ``nbytes`` counts positions and values only)."""

    positions: torch.Tensor
    values: torch.Tensor
    bn: dict[str, dict[str, torch.Tensor]]
    head: nn.Linear

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.positions) + _tensor_bytes(self.values)


class CompactDelta:
    """One specialist's delta held on a device in about its stored bytes (see the module doc).

    ``meta`` is the stored delta's metadata; ``nbytes`` what this object holds; ``working_set``
    the most bytes one :meth:`decode` and its use in a routed group hold at once (positions,
    values and the resident's saved entries: 16 bytes a kept entry, freed after the group)."""

    def __init__(self, packed: PackedDelta, layout: FlatLayout, device: torch.device | str) -> None:
        device = torch.device(device)
        t, meta = packed.tensors, packed.meta
        self.meta = meta
        layers = meta["layers"]
        missing = sorted(set(layers) - set(layout.slots))
        if missing:
            raise ValueError(f"the delta changes weight(s) {missing} that are not in the layout")
        widths = {int(e["bits"]) for e in layers.values()}
        if len(widths) > 1:
            raise ValueError(f"a delta's layers must share one bit width to be held compact, got {sorted(widths)}")
        self.bits = widths.pop() if widths else 4
        positions, codes, values16, scales, counts = [], [], [], [], []
        for name in sorted(layers, key=lambda n: layout.slots[n][0]):  # buffer order: positions stay sorted
            entry = layers[name]
            offset, shape = layout.slots[name]
            if list(shape) != list(entry["shape"]):
                raise ValueError(f"the delta of {name} has shape {entry['shape']}, the resident's weight {list(shape)}")
            numel, nnz = int(np.prod(shape)), int(entry["nnz"])
            pos = layer_positions(t, name, entry)
            positions.append(pos + offset)
            if self.bits == 16:
                values16.append(t[f"w.{name}.values"].half())
            else:
                codes.append(unpack_codes(t[f"w.{name}.codes"].numpy(), self.bits, nnz))
                fan = numel // shape[0]
                scales.append(t[f"w.{name}.scales"].float())
                counts.append(np.bincount(pos // fan, minlength=shape[0]))
        pos = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
        self.nnz = int(pos.size)
        gaps = np.diff(pos, prepend=0)  # first "gap" is the first position itself: positions = cumsum(gaps)
        big = np.flatnonzero(gaps > _GAP_MAX)
        self.gaps = torch.from_numpy(np.where(gaps > _GAP_MAX, 0, gaps).astype(np.uint8)).to(device)
        self.exc_index = torch.from_numpy(big.astype(np.int64)).to(device)
        self.exc_gap = torch.from_numpy(gaps[big].astype(np.int64)).to(device)
        if self.bits == 16:
            self.values16 = torch.cat(values16).to(device) if values16 else torch.zeros(0, dtype=torch.half, device=device)
        else:
            self.qmin = symmetric_qrange(self.bits)[0]
            all_codes = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int64)
            self.codes = torch.from_numpy(pack_codes(all_codes, self.bits)).to(device)
            self.scales = torch.cat(scales).to(device) if scales else torch.zeros(0, device=device)
            c = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
            # int16 when every channel keeps < 32768 entries (widened per decode: repeat_interleave
            # takes int32 or int64 repeats).
            self.counts = torch.from_numpy(c.astype(np.int16 if c.max(initial=0) < 2**15 else np.int32)).to(device)
            step = self.bits if 8 % self.bits == 0 else 1  # 3-bit codes straddle bytes: unpack bit by bit
            self._shifts = torch.arange(0, 8, step, dtype=torch.uint8, device=device)
            self._place = (1 << torch.arange(self.bits, device=device)).to(torch.int32)
        self.bn = {n: {k: t[f"bn.{n}.{k}"].float().to(device) for k in BN_TENSORS} for n in meta["bn"]}
        w = t["head.weight"]
        self.head = nn.Linear(w.shape[1], w.shape[0]).to(device)
        with torch.no_grad():
            self.head.weight.copy_(w)
            self.head.bias.copy_(t["head.bias"])
        self.head.eval()
        for p in self.head.parameters():
            p.requires_grad_(False)

    @property
    def nbytes(self) -> int:
        held = [self.gaps, self.exc_index, self.exc_gap, self.head.weight, self.head.bias]
        held += [self.values16] if self.bits == 16 else [self.codes, self.scales, self.counts]
        held += [x for d in self.bn.values() for x in d.values()]
        return sum(_tensor_bytes(x) for x in held)

    @property
    def working_set(self) -> int:
        # decoding: values, the int64 index and the per-entry scales; using: int64 positions,
        # values and the resident's saved entries — 16 bytes a kept entry either way.
        return self.nnz * (8 + 4 + 4)

    def _codes(self) -> torch.Tensor:
        """The unsigned b-bit codes ``[nnz]`` (uint8, or int32 for 3 bits)."""
        if self.bits == 8:
            return self.codes
        mask = (1 << self.bits) - 1 if 8 % self.bits == 0 else 1
        parts = ((self.codes[:, None] >> self._shifts) & mask).reshape(-1)
        if 8 % self.bits == 0:
            return parts[: self.nnz]
        return (parts[: self.nnz * self.bits].view(self.nnz, self.bits).to(torch.int32) * self._place).sum(1)

    @torch.no_grad()
    def decode(self) -> DecodedDelta:
        """Positions and fp32 values, on this delta's device (no host round trip, no sync).

        Values first: spreading the scales over the entries takes an int64 index per entry
        inside ``repeat_interleave``, which is then gone before the int64 positions exist, so
        no step holds more than 16 bytes a kept entry (:attr:`working_set`)."""
        if self.bits == 16:
            values = self.values16.float()
        else:
            values = self._codes().float()
            values += self.qmin  # the integer code q, exact in fp32
            per_entry = torch.repeat_interleave(self.scales, self.counts.int(), output_size=self.nnz)
            values *= per_entry  # q * s in fp32: materialize's product, bit for bit
            del per_entry
        if self.exc_index.numel():
            g = self.gaps.long()
            g.scatter_(0, self.exc_index, self.exc_gap)
            positions = g.cumsum_(0)
        else:
            positions = torch.cumsum(self.gaps, 0, dtype=torch.int64)
        return DecodedDelta(positions, values, self.bn, self.head)
