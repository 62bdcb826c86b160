"""The model runner: the one place that runs the LLM. The scheduler speaks to it through
`ModelRunner`; `TorchRunner` is today's implementation (transformers on CPU or GPU), and another
runtime implements the same calls (`model.serving.llama_runner.LlamaRunner`, llama.cpp).

A runner's state is one session's cache, opaque to everything above it but for `nbytes()`. Prefill
runs on one session's state (B=1), a chunk at a time, so a follow-up feeds only its new tail. The
decode batch is the runner's own: a state joins it after its prefill, the rows advance together one
token per `decode`, and a row leaves with its state for the session to keep.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from model.nn.skingpt import IMAGE_TOKEN_ID
from model.serving.kv_cache import Batch, copy_prefix, new_cache, trim_cache
from model.serving.requests import ImagePosition, Position, starts_image


MakeRoom = Callable[[], bool]  # drop the least recently used idle session; False when none is left


def no_room() -> bool:
    """A `MakeRoom` with nothing to drop (a runner driven on its own, as in tests)."""
    return False


class ModelRunner(Protocol):
    """Everything the engine and the scheduler ask of a runtime. `make_room` is the session cache's,
    passed with each call that may need KV room: a runtime whose cache is a fixed pool (llama.cpp)
    asks it when the pool is full; one whose caches grow (torch) never does."""

    device: torch.device  # where image embeddings and sampling live
    # positions one prefill call takes: what a streaming answer may wait between two of its tokens
    prefill_chunk: int
    # a fixed pool's size in bytes, which is then the idle sessions' whole budget; None: caches grow, and
    # the engine's budget bounds what idle sessions keep
    kv_bytes: int | None

    def new_state(self) -> Any:
        """An empty session state."""

    def trim(self, state: Any, length: int) -> None:
        """Keep the first `length` positions of the state."""

    def prefill(self, state: Any, positions: Sequence[Position], embeds: Mapping[str, torch.Tensor],
                make_room: MakeRoom = no_room) -> torch.Tensor:
        """Feed `positions` after what the state holds (an image's run never split); (V,) logits of the last."""

    def share(self, source: Any, state: Any, length: int, make_room: MakeRoom = no_room) -> None:
        """`state` holds `source`'s first `length` positions and nothing else (`source` is unchanged):
        a prompt that starts as another did gets those positions without computing them again."""

    def join(self, state: Any) -> None:
        """The state's answer enters the decode batch as its last row."""

    def leave(self, row: int) -> Any:
        """Row `row` leaves the batch; its state (all it was fed) goes back to the session."""

    def decode(self, tokens: Sequence[int], make_room: MakeRoom = no_room) -> torch.Tensor:
        """Feed one token to every row, in row order; (B, V) logits."""

    def drop_batch(self) -> None:
        """After a failed step: every row's state is gone."""

    def free(self, state: Any) -> None:
        """A session's state is no longer needed."""

    def close(self) -> None:
        """Free what the runtime holds outside Python (the engine is done with it)."""


class TorchRunner:
    """transformers' causal LM with our growing KV caches; images enter through `embed_inputs`."""

    def __init__(self, model, device_lock: threading.Lock) -> None:
        self.model, self.lock = model, device_lock
        self.device = model.llm.get_input_embeddings().weight.device
        self.batch = Batch()
        # On a CPU 64 positions of the `small` preset take about 0.5 s; a GPU prefills 512 in milliseconds.
        self.prefill_chunk = 512 if self.device.type == "cuda" else 64
        self.kv_bytes: int | None = None  # caches grow: the session cache's byte budget bounds them

    def new_state(self):
        return new_cache()

    def trim(self, state, length: int) -> None:
        trim_cache(state, length)

    def prefill(self, state, positions: Sequence[Position], embeds: Mapping[str, torch.Tensor],
                make_room: MakeRoom = no_room) -> torch.Tensor:
        ids = torch.tensor([[IMAGE_TOKEN_ID if isinstance(s, ImagePosition) else s for s in positions]], device=self.device)
        keys = [s.key for s in positions if starts_image(s)]
        images = torch.stack([embeds[k] for k in keys]) if keys else None  # (N_img, Q, D)
        with self.lock, torch.no_grad():
            inputs = self.model.embed_inputs(ids, images)  # (1, T_chunk, D)
            out = self.model.llm(inputs_embeds=inputs, past_key_values=state, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    def share(self, source, state, length: int, make_room: MakeRoom = no_room) -> None:
        copy_prefix(source, state, length)  # torch caches share no memory: a copy, but no forward

    def join(self, state) -> None:
        self.batch.add(state)

    def leave(self, row: int):
        return self.batch.remove(row)

    def decode(self, tokens: Sequence[int], make_room: MakeRoom = no_room) -> torch.Tensor:
        with self.lock, torch.no_grad():
            positions, mask = self.batch.step_inputs()
            out = self.model.llm(input_ids=torch.tensor(list(tokens), device=self.device).unsqueeze(1),
                                 position_ids=positions, attention_mask=mask, past_key_values=self.batch.cache,
                                 use_cache=True)
            self.batch.advance()
        return out.logits[:, -1]  # (B, V)

    def drop_batch(self) -> None:
        self.batch = Batch()

    def free(self, state) -> None:
        pass  # torch frees a cache with its last reference

    def close(self) -> None:
        self.batch = Batch()
