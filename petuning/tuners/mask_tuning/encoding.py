"""Compact encoding of a set of flat positions in a weight: a bitmap or delta-coded varints, whichever is smaller.

A masked-tuning adapter is defined, for inference, by the positions its masks zero. They are stored per layer as
one uint8 tensor ``[kind, payload...]``:

- ``kind == BITMAP``: ``ceil(numel / 8)`` bytes, bit i (most significant first, ``numpy.packbits`` order) set when
  position i is in the set. Costs ``numel / 8`` bytes whatever the count.
- ``kind == DELTAS``: the count n, then the gaps ``p_0, p_1 - p_0 - 1, p_2 - p_1 - 1, ...`` of the sorted
  positions, all as LEB128 varints (7 bits per byte, high bit = "more bytes follow"). About one byte per position
  while the gaps stay below 128; smaller than the bitmap for sets of less than about 1/8 of the entries.

Both decode to the same sorted int64 tensor; :func:`encode_positions` picks the smaller.
"""

from __future__ import annotations

import torch

BITMAP, DELTAS = 1, 2
_MAX_VARINT_BYTES = 9  # 63 bits


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Flatten a boolean tensor and pack it into uint8, 8 entries per byte, most significant bit first
    (``numpy.packbits`` order); the last byte is padded with zeros."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits of ``packed`` as a flat boolean tensor."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel].bool()


def varints(values: torch.Tensor) -> torch.Tensor:
    """LEB128 bytes (uint8) of non-negative int64 ``values``: 7 bits per byte, low bits first, high bit set on
    every byte but a number's last."""
    values = values.reshape(-1).long().cpu()
    n_bytes = torch.ones_like(values)
    for j in range(1, _MAX_VARINT_BYTES):
        n_bytes += values >= (1 << (7 * j))
    owner = torch.repeat_interleave(torch.arange(values.numel()), n_bytes)
    j = torch.arange(owner.numel()) - (torch.cumsum(n_bytes, 0) - n_bytes)[owner]
    out = (values[owner] >> (7 * j)) & 0x7F
    out |= (j < n_bytes[owner] - 1).long() << 7
    return out.to(torch.uint8)


def from_varints(data: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`varints` (int64). Raises ValueError on a stream that ends inside a number."""
    data = data.reshape(-1).long().cpu()
    if data.numel() == 0:
        return data
    ends = data < 0x80
    if not bool(ends[-1]):
        raise ValueError("the position list ends inside a number")
    group = torch.cumsum(ends.long(), 0) - ends.long()
    starts = torch.cat([torch.ones(1, dtype=torch.bool), ends[:-1]]).nonzero().squeeze(1)
    j = torch.arange(data.numel()) - starts[group]
    if int(j.max()) >= _MAX_VARINT_BYTES:
        raise ValueError("a number in the position list is longer than 63 bits")
    return torch.zeros(starts.numel(), dtype=torch.long).scatter_add_(0, group, (data & 0x7F) << (7 * j))


def encode_positions(positions: torch.Tensor, numel: int) -> torch.Tensor:
    """``[kind, payload...]`` (uint8, on the CPU) for sorted distinct ``positions`` in ``[0, numel)``: the bitmap
    or the varint deltas, whichever is smaller (ties go to the bitmap)."""
    positions = positions.reshape(-1).long().cpu()
    gaps = torch.diff(positions, prepend=positions.new_full((1,), -1)) - 1
    deltas = varints(torch.cat([torch.tensor([positions.numel()]), gaps]))  # the count first: truncation shows
    if deltas.numel() < (numel + 7) // 8:
        return torch.cat([torch.tensor([DELTAS], dtype=torch.uint8), deltas])
    bits = torch.zeros(numel, dtype=torch.bool)
    bits[positions] = True
    return torch.cat([torch.tensor([BITMAP], dtype=torch.uint8), pack_bits(bits)])


def decode_positions(data: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`encode_positions`: sorted int64 positions. Raises ValueError, saying what is wrong, when
    ``data`` is not an encoding of positions in ``[0, numel)``."""
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1 or data.numel() == 0:
        raise ValueError(f"expected a non-empty 1-d uint8 tensor, got {_describe(data)}")
    kind, payload = int(data[0]), data[1:]
    if kind == BITMAP:
        if payload.numel() != (numel + 7) // 8:
            raise ValueError(f"a bitmap of {payload.numel()} bytes cannot describe a weight of {numel} entries")
        return unpack_bits(payload.cpu(), numel).nonzero().squeeze(1)
    if kind == DELTAS:
        numbers = from_varints(payload)
        if numbers.numel() == 0 or int(numbers[0]) != numbers.numel() - 1:
            count = int(numbers[0]) if numbers.numel() else "no"
            raise ValueError(f"the position list announces {count} positions but holds {max(numbers.numel() - 1, 0)}")
        positions = torch.cumsum(numbers[1:] + 1, 0) - 1
        if positions.numel() and int(positions[-1]) >= numel:
            raise ValueError(f"position {int(positions[-1])} is outside a weight of {numel} entries")
        return positions
    raise ValueError(f"unknown encoding kind {kind} (expected {BITMAP} = bitmap or {DELTAS} = deltas)")


def _describe(data) -> str:
    if isinstance(data, torch.Tensor):
        return f"a {data.dim()}-d {data.dtype} tensor of {data.numel()} values"
    return type(data).__name__
