"""The LLM as one GGUF file, for llama.cpp: written tensor by tensor from our Hugging Face-named
weights with the `gguf` package, then quantised by llama.cpp's own quantiser.

A GGUF bundle keeps `llm/config.json` and our tokenizer beside `llm/model.gguf`: prompts are
tokenised by our tokenizer and fed to llama.cpp as ids, so an answer never depends on llama.cpp's
tokenizer. The vocabulary written into the file is there because llama.cpp will not load a model
without one; it holds our tokenizer's pieces, id for id.

Two facts of llama.cpp's Llama layout (its own converter does the same):
- names: `model.layers.N.self_attn.q_proj.weight` is `blk.N.attn_q.weight`, and so on (`_NAMES`);
- the query and key projections are stored with each head's rotary halves interleaved, because
  llama.cpp rotates adjacent pairs where transformers rotates the two halves (`_interleave_rope`).
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from model.choices import GGUF, GGUF_FILE_TYPES, ChoiceError, check_choice
from model.errors import UserFacingError
from model.nn.config import LLMConfig

GGUF_FILE = "model.gguf"
# --mode: llama.cpp's file types (enum llama_ftype). f32 and f16 are written directly, the rest
# quantised from an f16 file by llama.cpp.
LLAMA_CPP_INSTALL = ("install llama.cpp's Python bindings: `.venv/bin/pip install -r requirements.txt` "
                     "(builds llama-cpp-python from source with cmake and a C++ compiler)")

_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


class GGUFError(UserFacingError, RuntimeError):
    """A GGUF file that cannot be written, quantised or loaded, or llama.cpp missing."""


def require_llama_cpp():
    """The low-level llama.cpp bindings (logging only its errors), or a message naming the install step."""
    try:
        import llama_cpp
    except ImportError as err:
        raise GGUFError(f"this bundle's LLM is a GGUF file, which llama.cpp runs, but llama-cpp-python is not "
                        f"installed ({err}); {LLAMA_CPP_INSTALL}") from None
    _quiet(llama_cpp)
    return llama_cpp


_LOG_ERROR = 3  # enum ggml_log_level
_LOG_CALLBACK = None


def _quiet(llama_cpp) -> None:
    """llama.cpp logs every load and quantisation to stderr; keep its errors (no prompt is ever logged)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        def keep_errors(level: int, text: bytes, _user) -> None:
            if level == _LOG_ERROR and b"failed to find a memory slot" not in text:  # (the runner makes room)
                os.write(2, b"llama.cpp: " + text)

        _LOG_CALLBACK = llama_cpp.llama_log_callback(keep_errors)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def gguf_name(name: str) -> str:
    """Our (Hugging Face) parameter name -> llama.cpp's."""
    if name in _NAMES:
        return _NAMES[name]
    match = _LAYER.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise GGUFError(f"no GGUF name for the LLM tensor {name}")
    return f"blk.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def _interleave_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads*D, C) rows in transformers' rotary order (halves) -> llama.cpp's (adjacent pairs)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _stored(name: str, tensor: torch.Tensor, cfg: LLMConfig, dtype: str) -> np.ndarray:
    if name.endswith("q_proj.weight"):
        tensor = _interleave_rope(tensor, cfg.num_heads)
    elif name.endswith("k_proj.weight"):
        tensor = _interleave_rope(tensor, cfg.num_kv_heads)
    half = dtype == "f16" and tensor.dim() == 2  # norms stay f32, as llama.cpp keeps them
    return tensor.to(torch.float16 if half else torch.float32).contiguous().numpy()


def _vocabulary(tokenizer: Any, size: int) -> tuple[list[str], list[int]]:
    """Our tokenizer's pieces and their kinds (normal, control, byte), padded to the model's rows."""
    from gguf import TokenType

    count = min(len(tokenizer), size)
    pieces = tokenizer.convert_ids_to_tokens(list(range(count)))
    special = set(tokenizer.all_special_ids)
    tokens, kinds, seen = [], [], set()
    for i in range(size):
        piece = pieces[i] if i < count and pieces[i] is not None else f"<unused{i}>"
        if piece in seen:
            piece = f"{piece}<dup{i}>"  # llama.cpp maps pieces back to ids: they must be unique
        seen.add(piece)
        tokens.append(piece)
        if i in special or i >= count:
            kinds.append(TokenType.CONTROL)
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            kinds.append(TokenType.BYTE)
        else:
            kinds.append(TokenType.NORMAL)
    return tokens, kinds


def write_gguf(path: Path, cfg: LLMConfig, tokenizer: Any, params: Iterable[tuple[str, tuple[int, ...]]],
               fetch: Callable[[str], torch.Tensor], dtype: str = "f16", title: str = "skingpt-llm") -> Path:
    """Write the LLM as one f32 / f16 GGUF, fetching (and dropping) one tensor at a time, so that a 7B
    model never sits whole in memory. `params` lists (our name, shape) in the order written."""
    from gguf import GGUFWriter

    if dtype not in ("f32", "f16"):
        raise GGUFError(f"write_gguf writes f32 or f16, not {dtype}; quantise with `quantize_gguf`")
    params = list(params)
    writer = GGUFWriter(path, arch="llama")
    writer.add_name(title)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(GGUF_FILE_TYPES[dtype])
    tokens, kinds = _vocabulary(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(kinds)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_add_bos_token(False)  # we feed ids, BOS included by our prompt
    for name, shape in params:
        half = dtype == "f16" and len(shape) == 2
        itemsize = 2 if half else 4
        writer.add_tensor_info(gguf_name(name), shape, np.dtype(np.float16 if half else np.float32),
                               int(np.prod(shape)) * itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape in params:
        tensor = fetch(name)
        if tuple(tensor.shape) != tuple(shape):
            raise GGUFError(f"{name}: the weights have shape {tuple(tensor.shape)}, the model {tuple(shape)}")
        writer.write_tensor_data(_stored(name, tensor, cfg, dtype))
    writer.close()
    return path


def quantize_gguf(source: Path, out: Path, mode: str, threads: int = 0) -> Path:
    """llama.cpp's own quantiser: an f16 / f32 GGUF -> `mode` (q8_0, q4_0, q4_k_m). Tensors whose rows
    do not fit a k-quant's 256-wide blocks get llama.cpp's fallback type (tiny models only)."""
    llama_cpp = require_llama_cpp()
    try:
        check_choice("GGUF mode", mode, GGUF)
    except ChoiceError as err:
        raise GGUFError(str(err)) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_FILE_TYPES[mode]
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if status != 0 or not out.is_file():
        raise GGUFError(f"llama.cpp could not quantise {source} to {mode} (status {status})")
    return out


def llama_cpp_version() -> str:
    llama_cpp = require_llama_cpp()
    return getattr(llama_cpp, "__version__", "unknown")
