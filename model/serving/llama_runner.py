"""The llama.cpp model runner: the LLM of a GGUF bundle, run by llama.cpp on the CPU through
llama-cpp-python's low-level API. The image encoder and Q-Former stay in torch; their 32 query
embeddings enter llama.cpp as an embeddings batch, text as our tokenizer's ids (or, beside a photo,
their rows of the GGUF's token table).

One llama.cpp context serves every consultation. Its KV cache is unified (one pool of `kv_cells`
positions that every sequence draws from, allocated when the context is made), and each session's
state is one llama.cpp sequence:
- prefill feeds a chunk to the session's sequence: token ids, or, for a chunk with a photo (a batch
  holds ids or embeddings, not both), embeddings only, its words as rows of the GGUF's token table;
- the decode batch is one `llama_decode` of one token per row, each row its own sequence;
- trim removes a sequence's tail (`llama_memory_seq_rm`), so regenerate and cancel keep the prefix;
- share tags another sequence's leading cells with the state's (`llama_memory_seq_cp`): every
  consultation's prompt opens the same way, and that opening is computed once;
- a freed state gives its sequence back.
When the pool or the sequence ids run out, `make_room` (the session cache's: drop the least
recently used idle session) is asked before anything fails.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from model.nn.config import LLMConfig
from model.serving.requests import ImagePosition, Position
from model.serving.runner import MakeRoom, no_room
from model.serving.llama_backend import Threadpool, ensure_backends
from model.weights.gguf_llm import GGUFError, require_llama_cpp

_NO_KV_SLOT = 1  # llama_decode: could not find room in the KV cache for the batch
_LOAD_INTO_MEMORY = 0  # LLAMA_LOAD_MODE_NONE: read the file, not map it (see `_load_model`)
KV_BYTES = {"f32": 4, "f16": 2, "q8_0": 34 / 32}  # a KV value's bytes (q8_0: 32 int8 and one f16 scale)


@dataclass
class LlamaState:
    """One session's llama.cpp sequence: its id (None until first fed, or after being freed) and the
    number of positions it holds."""
    bytes_per_position: int
    seq: int | None = None
    length: int = 0

    def nbytes(self) -> int:
        return self.length * self.bytes_per_position


def kept_sequences(max_batch: int) -> int:
    """How many consultations' caches the server keeps at once: four times the batch, at least 32."""
    return max(4 * max_batch, 32)


def kv_bytes_per_position(cfg: LLMConfig, kv_type: str) -> int:
    """Keys and values of every layer for one position."""
    return int(2 * cfg.num_layers * cfg.num_kv_heads * (cfg.hidden_size // cfg.num_heads) * KV_BYTES[kv_type])


def default_threads() -> int:
    """llama.cpp's decode is memory-bound: one thread per core the process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class LlamaRunner:
    """`ModelRunner` over llama.cpp. `kv_cells` positions of KV cache shared by all sessions;
    `max_sequences` sessions may hold a sequence at once (idle ones are dropped to make room)."""

    prefill_chunk = 128  # positions per prefill step: llama.cpp's batched products want more than 64

    def __init__(self, gguf: Path, cfg: LLMConfig, device_lock: threading.Lock, *, kv_cells: int,
                 max_sequences: int, threads: int | None = None, kv_type: str = "f16") -> None:
        self.llama = llama = require_llama_cpp()
        self.device_lock = device_lock
        self.device = torch.device("cpu")
        self.threads = threads or default_threads()
        self._lock = threading.RLock()  # every llama.cpp call; free() comes from other threads
        self.model = _load_model(llama, Path(gguf), repack=_repackable(cfg))
        self._table = _token_table(Path(gguf))  # words of a prompt with a photo go in as its rows (see `_feed`)
        self.n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self.model))
        self.n_embd = llama.llama_model_n_embd(self.model)
        if (self.n_vocab, self.n_embd) != (cfg.vocab_size, cfg.hidden_size):
            raise GGUFError(f"{gguf} holds a model of vocabulary {self.n_vocab} and width {self.n_embd}, "
                            f"but the bundle's config says {cfg.vocab_size} and {cfg.hidden_size}")
        self.bytes_per_position = kv_bytes_per_position(cfg, kv_type)
        self.kv_cells, self.max_sequences = kv_cells, max_sequences
        self.kv_bytes = kv_cells * self.bytes_per_position  # the idle sessions' budget: the whole pool
        ctx = llama.llama_context_default_params()
        ctx.n_ctx = kv_cells
        ctx.n_batch = ctx.n_ubatch = max(self.prefill_chunk + 64, max_sequences)
        ctx.n_seq_max = max_sequences
        ctx.kv_unified = True  # one pool: an idle short session does not reserve a long one's room
        ctx.n_threads = ctx.n_threads_batch = self.threads
        ctx.type_k = ctx.type_v = {"f16": llama.GGML_TYPE_F16, "f32": llama.GGML_TYPE_F32,
                                   "q8_0": llama.GGML_TYPE_Q8_0}[kv_type]
        ctx.no_perf = False
        self.ctx = llama.llama_init_from_model(self.model, ctx)
        if not self.ctx:
            raise GGUFError(f"llama.cpp could not make a context of {kv_cells} positions ({kv_type} cache) for "
                            f"{gguf} (its reason is printed above); if memory ran out, lower {{setting:kv_cache_gb}}")
        self._pool = Threadpool(llama, self.threads)  # as llama-bench: workers kept, not made per call
        self._pool.attach(self.ctx)
        self.memory = llama.llama_get_memory(self.ctx)
        self.n_batch = ctx.n_batch
        self._tokens = llama.llama_batch_init(self.n_batch, 0, 1)
        self._embeds = llama.llama_batch_init(self.n_batch, self.n_embd, 1)
        self._free_seqs: deque[int] = deque(range(max_sequences))
        self.rows: list[LlamaState] = []

    @classmethod
    def for_bundle(cls, loaded, device_lock: threading.Lock, max_batch: int,
                   kv_cache_bytes: int | None) -> LlamaRunner:
        """The runner of a GGUF bundle: a KV pool of `kv_cache_bytes` (default, and at least: one full
        context), allocated up front, and sequences for four times the batch (idle sessions keep theirs)."""
        from model.weights.bundle import quantized_mode

        llm = loaded.config.llm
        context = loaded.config.context
        mode = quantized_mode(loaded.manifest)
        # An f32 file is for checking against torch: its cache is exact too. For a quantised LLM an 8-bit cache
        # costs nothing its weights have not already lost, and halves the pool (a 7B's context: 1.0 -> 0.53 GiB).
        # (q8_0 rows are blocks of 32: a head narrower than that, as in the tiny test models, stays f16.)
        kv_type = mode if mode in ("f32", "f16") else "q8_0" if (llm.hidden_size // llm.num_heads) % 32 == 0 else "f16"
        cells = max(context, (kv_cache_bytes or 0) // kv_bytes_per_position(llm, kv_type))
        return cls(loaded.gguf, llm, device_lock, kv_cells=cells, max_sequences=kept_sequences(max_batch), kv_type=kv_type)

    # -- ModelRunner -----------------------------------------------------------------------------
    def new_state(self) -> LlamaState:
        return LlamaState(self.bytes_per_position)

    def trim(self, state: LlamaState, length: int) -> None:
        with self._lock:
            if state.seq is not None and length < state.length:
                self.llama.llama_memory_seq_rm(self.memory, state.seq, length, -1)
            state.length = min(state.length, length)

    def prefill(self, state: LlamaState, positions: Sequence[Position], embeds: Mapping[str, torch.Tensor],
                make_room: MakeRoom = no_room) -> torch.Tensor:
        with self.device_lock, self._lock:
            if state.seq is None:
                state.seq = self._take_sequence(make_room)
            return self._feed(state, positions, embeds, make_room)

    def share(self, source: LlamaState, state: LlamaState, length: int, make_room: MakeRoom = no_room) -> None:
        """llama.cpp tags the cells of `source`'s first `length` positions with `state`'s sequence too: in the
        unified pool nothing is copied or computed, and the cells stay until no sequence holds them."""
        with self._lock:
            if state.seq is None:
                state.seq = self._take_sequence(make_room)
            else:
                self.llama.llama_memory_seq_rm(self.memory, state.seq, -1, -1)
            self.llama.llama_memory_seq_cp(self.memory, source.seq, state.seq, 0, length)
            state.length = length

    def join(self, state: LlamaState) -> None:
        self.rows.append(state)

    def leave(self, row: int) -> LlamaState:
        return self.rows.pop(row)

    def decode(self, tokens: Sequence[int], make_room: MakeRoom = no_room) -> torch.Tensor:
        with self.device_lock, self._lock:
            batch = self._tokens
            for i, (state, token) in enumerate(zip(self.rows, tokens)):
                batch.token[i], batch.pos[i] = token, state.length
                batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = 1, state.seq, 1
            batch.n_tokens = len(tokens)
            self._run(batch, len(tokens), make_room)
            for state in self.rows:
                state.length += 1
            return self._logits(len(tokens))  # (B, V)

    def drop_batch(self) -> None:
        rows, self.rows = self.rows, []
        for state in rows:
            self.free(state)

    def free(self, state: LlamaState) -> None:
        with self._lock:
            if state.seq is not None:
                self.llama.llama_memory_seq_rm(self.memory, state.seq, -1, -1)
                self._free_seqs.append(state.seq)
            state.seq, state.length = None, 0

    # -- llama.cpp ---------------------------------------------------------------------------------
    def _feed(self, state: LlamaState, positions: Sequence[Position], embeds: Mapping[str, torch.Tensor],
              make_room: MakeRoom) -> torch.Tensor:
        """Positions after what the state's sequence holds, in parts that fit llama.cpp's batch; (V,) logits of
        the last. A batch holds token ids or embeddings, not both: a chunk with a photo goes in as
        embeddings only (its words as rows of the GGUF's own token table), so that it is one
        `llama_decode` rather than one per run of each kind, each of which reads every weight."""
        photo = any(isinstance(s, ImagePosition) for s in positions)
        parts = [positions[i:i + self.n_batch] for i in range(0, len(positions), self.n_batch)]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if photo:
                self._fill(self._embeds, len(part), state, last, embeds=self._rows(part, embeds))
                self._run(self._embeds, len(part), make_room)
            else:
                self._fill(self._tokens, len(part), state, last, tokens=part)
                self._run(self._tokens, len(part), make_room)
            state.length += len(part)
        return self._logits(1)[0]

    def _rows(self, positions: Sequence[Position], embeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(T, D) fp32 input rows: an image position's query embedding, or a token's row of the GGUF's token
        table, dequantised as llama.cpp's own lookup does (the same values, so the same answer)."""
        ids = [s for s in positions if not isinstance(s, ImagePosition)]
        words = iter(torch.from_numpy(_dequantize(self._table, ids)) if ids else ())
        return torch.stack([embeds[s.key][s.index].float() if isinstance(s, ImagePosition) else next(words)
                            for s in positions]).contiguous()

    def _take_sequence(self, make_room: MakeRoom) -> int:
        while not self._free_seqs:
            if not make_room():
                raise GGUFError(f"all {self.max_sequences} llama.cpp sequences hold answers in progress; "
                                f"lower {{setting:max_batch}} or wait for an answer to end")
        return self._free_seqs.popleft()

    def _fill(self, batch, count: int, state: LlamaState, logits_last: bool, *, tokens: Sequence[int] = (),
              embeds: torch.Tensor | None = None) -> None:
        if embeds is not None:
            ctypes.memmove(batch.embd, embeds.numpy().ctypes.data, embeds.numel() * 4)
        for i in range(count):
            if embeds is None:
                batch.token[i] = tokens[i]
            batch.pos[i] = state.length + i
            batch.n_seq_id[i], batch.seq_id[i][0] = 1, state.seq
            batch.logits[i] = 1 if logits_last and i == count - 1 else 0
        batch.n_tokens = count

    def _run(self, batch, count: int, make_room: MakeRoom) -> None:
        """llama_decode, making room in the KV cache (dropping idle sessions) while it has none."""
        while True:
            status = self.llama.llama_decode(self.ctx, batch)
            if status == 0:
                return
            if status != _NO_KV_SLOT:
                raise GGUFError(f"llama.cpp failed to decode a batch of {count} positions (status {status})")
            if not make_room():
                raise GGUFError(f"llama.cpp's KV cache ({self.kv_cells} positions) is full with answers in "
                                f"progress; raise {{setting:kv_cache_gb}} or lower {{setting:max_batch}}")

    def _logits(self, rows: int) -> torch.Tensor:
        """The last `rows` outputs' logits, copied out of llama.cpp's buffer: (rows, V)."""
        pointer = self.llama.llama_get_logits(self.ctx)
        view = np.ctypeslib.as_array(pointer, shape=(rows, self.n_vocab))
        return torch.from_numpy(view.copy())

    # -- llama.cpp's own timing (the bench's peer figure) -----------------------------------------
    def plain_timing(self, prompt: Sequence[int], new_tokens: int) -> dict[str, float]:
        """llama.cpp's own speed on this model, taken as llama-bench takes it: a context of its own made
        with llama-bench's parameters (f16 cache, one sequence, n_ctx just the positions needed,
        n_batch 2048 / n_ubatch 512, flash attention auto) and a persistent thread pool, one warm-up
        prompt and one warm-up token, then the prompt in one batch and `new_tokens` tokens one call
        each, timed by the wall clock around llama_decode and llama_synchronize. Nothing our serving
        context chooses (the pooled cache, its 8-bit type, many sequences) can slow the peer."""
        import time

        llama = self.llama
        params = llama.llama_context_default_params()
        params.n_ctx = len(prompt) + new_tokens
        params.n_batch, params.n_ubatch = 2048, 512
        params.n_threads = params.n_threads_batch = self.threads
        with self.device_lock, self._lock:
            ctx = llama.llama_init_from_model(self.model, params)
            if not ctx:
                raise GGUFError("llama.cpp could not make a context to time itself")
            pool = Threadpool(llama, self.threads)
            pool.attach(ctx)
            try:
                self._timed(ctx, list(prompt), 1)  # warm-up, as llama-bench: the prompt, then one token
                self._timed(ctx, [1], 1, position=len(prompt))
                llama.llama_memory_clear(llama.llama_get_memory(ctx), False)
                started = time.perf_counter()
                token = self._timed(ctx, list(prompt), 1)
                prefill_s = time.perf_counter() - started
                started = time.perf_counter()
                self._timed(ctx, [token], new_tokens, position=len(prompt))
                decode_s = time.perf_counter() - started
            finally:
                llama.llama_free(ctx)
                pool.close()
        return {"prompt_tokens": len(prompt), "prefill_ms": 1000 * prefill_s, "decode_tokens": new_tokens,
                "decode_ms": 1000 * decode_s, "prefill_tokens_per_s": len(prompt) / prefill_s,
                "decode_tokens_per_s": new_tokens / decode_s}

    def _timed(self, ctx, ids: list[int], calls: int, position: int = 0) -> int:
        """`calls` llama_decode calls on sequence 0 of `ctx`, each synchronised: `ids` first, then each
        time the greedy token the previous call chose; the last token chosen."""
        llama = self.llama
        batch = llama.llama_batch_init(len(ids), 0, 1)
        try:
            for _ in range(calls):
                for i, token in enumerate(ids):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = token, position + i, 1, 0
                    batch.logits[i] = i == len(ids) - 1
                batch.n_tokens = len(ids)
                if llama.llama_decode(ctx, batch) != 0:
                    raise GGUFError("llama.cpp failed to decode while timing itself")
                llama.llama_synchronize(ctx)
                position += len(ids)
                logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(ctx, len(ids) - 1), shape=(self.n_vocab,))
                ids = [int(logits.argmax())]
            return ids[0]
        finally:
            llama.llama_batch_free(batch)

    def close(self) -> None:
        """Free the context and its KV pool (the model stays loaded for other runners)."""
        with self._lock:
            if self.ctx:
                self.llama.llama_batch_free(self._tokens)
                self.llama.llama_batch_free(self._embeds)
                self.llama.llama_free(self.ctx)
                self.ctx = None
                self._pool.close()


def _token_table(gguf_file: Path):
    """The GGUF's token embedding table, mapped (rows are read as a prompt needs them)."""
    import gguf

    return next(t for t in gguf.GGUFReader(gguf_file).tensors if t.name == "token_embd.weight")


def _dequantize(table, ids: list[int]) -> np.ndarray:
    """Rows `ids` of a GGUF tensor as fp32 (T, D), by the gguf package's reference dequantiser."""
    from gguf import GGMLQuantizationType, quants

    rows = table.data[ids]
    if table.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return np.ascontiguousarray(rows, dtype=np.float32)
    return quants.dequantize(rows, table.tensor_type).astype(np.float32, copy=False)


_MODELS: dict[tuple[Path, int, bool], object] = {}  # loaded once a process, shared by every runner
_MODELS_LOCK = threading.Lock()


def _repackable(cfg: LLMConfig) -> bool:
    """Whether llama.cpp may re-lay the weights for its CPU kernels (its "extra buffer types": AVX2/AVX-512
    repack, and Intel AMX tiles where the CPU has them). Its AMX q8_0 matmul crashed (SIGSEGV in
    ggml_backend_amx_mul_mat) on an AMX machine for the tiny test models (hidden 64); every full-size
    Llama has widths in multiples of 256, where those kernels are at home, so narrower models go without."""
    return cfg.hidden_size % 256 == 0 and cfg.intermediate_size % 256 == 0


def _load_model(llama, gguf: Path, repack: bool = True):
    key = (gguf.resolve(), gguf.stat().st_mtime_ns, repack)
    with _MODELS_LOCK:
        if key not in _MODELS:
            llama.llama_backend_init()
            ensure_backends(llama)  # a build with runtime CPU dispatch has none linked in
            params = llama.llama_model_default_params()
            # On a CPU llama.cpp re-lays most weights for its AVX2 kernels (its "repack" buffer); a mapped
            # file would stay resident beside that copy: a 7B q4_0 peaked at 7.3 GiB mapped, 3.9 read.
            params.load_mode = _LOAD_INTO_MEMORY
            params.use_extra_bufts = repack
            model = llama.llama_model_load_from_file(str(gguf).encode(), params)
            if not model:
                raise GGUFError(f"llama.cpp could not load {gguf}: the file is not a Llama GGUF it can read; "
                                f"write the bundle again with {{command:quantize}}")
            _MODELS[key] = model
        return _MODELS[key]
