"""Image embeddings, computed once per photo and kept by its pixel key (least recently used dropped)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import torch

from model.prompt.conversation import ImageInput


class ImageCache:
    def __init__(self, encode: Callable[[ImageInput], torch.Tensor], max_images: int) -> None:
        self._encode, self.max_images = encode, max_images
        self._images: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image: ImageInput) -> torch.Tensor:
        with self._lock:
            if image.key in self._images:
                self._images.move_to_end(image.key)
                return self._images[image.key]
        embeds = self._encode(image)
        with self._lock:
            self._images[image.key] = embeds
            while len(self._images) > self.max_images:
                self._images.popitem(last=False)
        return embeds

    def forget(self, keys: list[str] | None = None) -> None:
        """Drop the given keys, or all."""
        with self._lock:
            for key in list(self._images) if keys is None else keys:
                self._images.pop(key, None)
