"""KV caches that grow in place, and a batch of them decoded together.

transformers' `DynamicLayer` appends by `torch.cat`, so every decode step copies the whole cache
of every layer (for 8 answers of 500 positions in the `small` preset, about 0.8 GB a step). Here
each layer keeps a buffer with spare capacity and writes new positions into it: a step copies only
the new position. This is the one place that depends on transformers' cache classes.

A `Batch` holds the caches of the answers being decoded together as one tensor per layer,
(B, H, L, D), each row left-padded to the longest; a row's padding is masked out and its position
ids count only its own positions, so every row computes what it would compute alone. Rows join
after their own prefill and leave with their cache, unpadded, for the session to keep.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

_SPARE = 128  # positions of headroom added when a buffer grows


class GrowingLayer(DynamicLayer):
    """One layer's keys and values in a buffer with spare capacity: `update` writes, never copies all."""

    def __init__(self) -> None:  # not the base's: `keys` and `values` are views of the buffers here
        self._k = self._v = None
        self.length = 0
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._k = self._v = None
        self.length = 0
        self.is_initialized = True

    def _reserve(self, like: torch.Tensor, need: int) -> None:
        capacity = 0 if self._k is None else self._k.shape[-2]
        if self._k is not None and need <= capacity and like.shape[0] == self._k.shape[0]:
            return
        shape = (*like.shape[:2], max(need + _SPARE, capacity + capacity // 2), like.shape[-1])  # (B, H, cap, D)
        k, v = like.new_empty(shape), like.new_empty(shape)
        if self.length:
            k[..., :self.length, :] = self._k[..., :self.length, :]
            v[..., :self.length, :] = self._v[..., :self.length, :]
        self._k, self._v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._reserve(key_states, end)
        self._k[..., self.length:end, :] = key_states
        self._v[..., self.length:end, :] = value_states
        self.length = end
        return self._k[..., :end, :], self._v[..., :end, :]

    def set(self, keys: torch.Tensor, values: torch.Tensor, capacity: int | None = None) -> None:
        """Hold exactly these (B, H, L, D) states (a batch being formed, or a row leaving one)."""
        self.lazy_initialization(keys, values)
        self._reserve(keys, max(keys.shape[-2], capacity or 0))
        self._k[..., :keys.shape[-2], :] = keys
        self._v[..., :keys.shape[-2], :] = values
        self.length = keys.shape[-2]

    @property
    def keys(self) -> torch.Tensor:
        return self._k[..., :self.length, :]

    @property
    def values(self) -> torch.Tensor:
        return self._v[..., :self.length, :]

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if self.is_initialized and tokens_to_remove < 0:
            self.length = max(0, self.length + tokens_to_remove)

    def reset(self) -> None:
        self.is_initialized, self._k, self._v, self.length = False, None, None, 0

    def nbytes(self) -> int:
        return 0 if not self.is_initialized or self._k is None else 2 * self._k.numel() * self._k.element_size()


class KVCache(Cache):
    """A transformers cache made of `GrowingLayer`s (one per decoder layer, created on first use)."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=GrowingLayer)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def new_cache() -> KVCache:
    return KVCache()


def copy_prefix(source: KVCache, target: KVCache, length: int) -> None:
    """`target` holds a copy of `source`'s first `length` positions (whatever it held before is gone)."""
    target.layers = []
    for layer in source.layers:
        copy = GrowingLayer()
        copy.set(layer.keys[..., :length, :], layer.values[..., :length, :])
        target.layers.append(copy)


def trim_cache(cache: KVCache, length: int) -> None:
    """Keep the first `length` positions."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class Batch:
    """The caches of the rows decoding together, left-padded into one tensor per layer."""

    def __init__(self) -> None:
        self.cache: KVCache | None = None
        self.lengths: list[int] = []  # each row's own positions (its next position id)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:  # L: positions per row, padding included
        return self.cache.get_seq_length() if self.cache is not None else 0

    def add(self, cache: KVCache) -> None:
        """A row joins with its own (B=1) cache; the batch is re-laid to the longer of the two."""
        length = cache.get_seq_length()
        rows = [(layer.keys, layer.values) for layer in self.cache.layers] if self.cache is not None else None
        width = max(self.width, length)
        merged = KVCache()
        for i, layer in enumerate(cache.layers):
            keys, values = _pad_left(layer.keys, width), _pad_left(layer.values, width)
            if rows is not None:
                keys = torch.cat([_pad_left(rows[i][0], width), keys])
                values = torch.cat([_pad_left(rows[i][1], width), values])
            merged.layers.append(GrowingLayer())
            merged.layers[-1].set(keys, values)
        self.cache = merged
        self.lengths.append(length)

    def remove(self, row: int) -> KVCache:
        """A row leaves: its cache, unpadded; the others are re-laid without it (and without padding
        that no remaining row needs)."""
        length, width = self.lengths.pop(row), self.width
        keep = [r for r in range(len(self.lengths) + 1) if r != row]
        out, rest = KVCache(), KVCache()
        new_width = max(self.lengths, default=0)
        index = torch.tensor(keep, device=self.cache.layers[0].keys.device)
        for layer in self.cache.layers:
            out.layers.append(GrowingLayer())
            out.layers[-1].set(layer.keys[row:row + 1, :, width - length:], layer.values[row:row + 1, :, width - length:])
            if keep:
                rest.layers.append(GrowingLayer())
                rest.layers[-1].set(layer.keys[index, :, width - new_width:], layer.values[index, :, width - new_width:])
        self.cache = rest if keep else None
        return out

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 1) position ids of the next token, and the (B, L+1) attention mask (None: no padding)."""
        device = self.cache.layers[0].keys.device
        positions = torch.tensor(self.lengths, device=device).unsqueeze(1)
        pads = [self.width - n for n in self.lengths]
        if not any(pads):
            return positions, None
        columns = torch.arange(self.width + 1, device=device)
        return positions, (columns.unsqueeze(0) >= torch.tensor(pads, device=device).unsqueeze(1)).long()

    def advance(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]


def _pad_left(states: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, width, D), zeros in front (masked, never attended)."""
    missing = width - states.shape[-2]
    if missing <= 0:
        return states
    return torch.cat([states.new_zeros((*states.shape[:2], missing, states.shape[-1])), states], dim=-2)
