"""Typed configuration for every part of the SkinGPT stack.

One frozen dataclass per part. Defaults live here and nowhere else; a YAML file round-trips through
`to_dict` / `from_dict`, validated by pydantic against the dataclasses' own types (`Literal`
choices, fixed-length tuples), and a key this module does not know is an error, never silently
dropped. Every message names the field by its dotted path, and the file.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from model.choices import PRESETS as PRESET_NAMES
from model.errors import UserFacingError


class ConfigError(UserFacingError, ValueError):
    """A configuration file or dict that does not describe a valid model."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class VisionConfig:
    """EVA ViT image encoder (timm `Eva`) followed by `ln_vision`."""

    img_size: int = 224
    patch_size: int = 14
    embed_dim: int = 1408
    depth: int = 39  # EVA-CLIP ViT-g has 40 blocks; BLIP-2 drops the last one
    num_heads: int = 16
    mlp_ratio: float = 4.3637  # int(1408 * 4.3637) = 6144 hidden units
    norm_eps: float = 1e-6  # pre-norm LayerNorms inside each block
    ln_vision_eps: float = 1e-5  # PyTorch's default; the reference's ln_vision

    def __post_init__(self) -> None:
        require(self.img_size % self.patch_size == 0, "vision.img_size must be a multiple of patch_size")
        require(self.embed_dim % self.num_heads == 0, "vision.embed_dim must be divisible by num_heads")

    @property
    def num_tokens(self) -> int:
        """Patch tokens plus the class token: 16 * 16 + 1 = 257 at 224 px."""
        return (self.img_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class QFormerConfig:
    """BLIP-2 Q-Former: a BERT encoder whose learned queries cross-attend to the image tokens."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2  # cross-attention in layers 0, 2, 4, ...
    num_query_tokens: int = 32
    max_position_embeddings: int = 512

    def __post_init__(self) -> None:
        require(self.hidden_size % self.num_heads == 0, "qformer.hidden_size must be divisible by num_heads")
        require(self.num_query_tokens > 0, "qformer.num_query_tokens must be positive")


@dataclass(frozen=True)
class LLMConfig:
    """A Llama-family decoder, in the terms of a Hugging Face `config.json`."""

    vocab_size: int = 32000
    hidden_size: int = 5120
    intermediate_size: int = 13824
    num_layers: int = 40
    num_heads: int = 40
    num_kv_heads: int = 40
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        require(self.hidden_size % self.num_heads == 0, "llm.hidden_size must be divisible by num_heads")
        require(self.num_heads % self.num_kv_heads == 0, "llm.num_heads must be a multiple of num_kv_heads")


@dataclass(frozen=True)
class PreprocessConfig:
    """How a photo becomes pixels; stored with the weights it was trained with."""

    image_size: int = 224
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP constants
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    train_min_scale: float = 0.5  # random resized crop keeps 50-100% of the area in training

    def __post_init__(self) -> None:
        require(len(self.mean) == 3 and len(self.std) == 3, "preprocess.mean and std need three values (RGB)")
        require(0.0 < self.train_min_scale <= 1.0, "preprocess.train_min_scale must be in (0, 1]")


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding defaults; a request may override any of them."""

    max_new_tokens: int = 300
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0  # 0 disables top-k
    repetition_penalty: float = 1.0
    do_sample: bool = False
    max_context: int = 2000  # prompt plus new tokens, as in the reference

    def __post_init__(self) -> None:
        require(self.max_new_tokens > 0, "generation.max_new_tokens must be positive")
        require(self.temperature > 0, "generation.temperature must be positive")
        require(0 < self.top_p <= 1, "generation.top_p must be in (0, 1]")
        require(self.top_k >= 0, "generation.top_k must be >= 0")
        require(self.repetition_penalty > 0, "generation.repetition_penalty must be positive")
        require(self.max_context > self.max_new_tokens, "generation.max_context must exceed max_new_tokens")


@dataclass(frozen=True)
class SkinGPTConfig:
    """The whole stack, plus what travels with its weights (template, preprocessing, generation)."""

    name: str = "skingpt4-vicuna13b"
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    prompt_template: str = "skingpt4"  # a key of the template table; never guessed from a name
    image_placeholder: str = "<ImageHere>"

    def __post_init__(self) -> None:
        require(self.preprocess.image_size == self.vision.img_size,
                 f"preprocess.image_size ({self.preprocess.image_size}) must equal vision.img_size "
                 f"({self.vision.img_size})")

    # -- YAML round trip --------------------------------------------------------------------
    @property
    def context(self) -> int:
        """Positions one conversation may hold: the generation limit, within what the LLM was trained on."""
        return min(self.generation.max_context, self.llm.max_position_embeddings)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkinGPTConfig:
        return build_dataclass(cls, data, "config")

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path) -> SkinGPTConfig:
        return dataclass_from_yaml(cls, path, "config")


# -- presets ----------------------------------------------------------------------------------

_VICUNA7B_LLM = LLMConfig(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32)
_LLAMA13B_LLM = LLMConfig()
_LLAMA2_13B_LLM = LLMConfig(max_position_embeddings=4096, rms_norm_eps=1e-5)

# tiny: a few MB, runs every test on CPU in milliseconds. demo: what the app serves without real
# weights; still random, a little larger so that the pipeline has something to chew on.
_TINY = SkinGPTConfig(
    name="tiny",
    vision=VisionConfig(img_size=56, patch_size=14, embed_dim=48, depth=2, num_heads=4),
    qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                          max_position_embeddings=64),
    llm=LLMConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=4, max_position_embeddings=1024),
    preprocess=PreprocessConfig(image_size=56),
    generation=GenerationConfig(max_new_tokens=32, max_context=1024),
)
_DEMO = dataclasses.replace(
    _TINY,
    name="demo",
    vision=VisionConfig(img_size=112, patch_size=14, embed_dim=96, depth=2, num_heads=4),
    qformer=dataclasses.replace(_TINY.qformer, hidden_size=64, intermediate_size=128),
    llm=dataclasses.replace(_TINY.llm, vocab_size=2000, hidden_size=128, intermediate_size=256),
    preprocess=PreprocessConfig(image_size=112),
    generation=GenerationConfig(max_new_tokens=64, max_context=1024, do_sample=True, temperature=0.9),
)

# small: random weights sized so that decoding on a CPU is bound by reading the weights, as at full
# size (an LLM of 374 M parameters: 1.5 GB in fp32), with the ViT and Q-Former scaled down alike.
# For benchmarks (`bench --preset small --random-init`), never the default test run.
_SMALL = SkinGPTConfig(
    name="small",
    vision=VisionConfig(img_size=224, patch_size=14, embed_dim=384, depth=6, num_heads=6),
    qformer=QFormerConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                          max_position_embeddings=64),
    llm=LLMConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16,
                  num_kv_heads=16, max_position_embeddings=2048),
)

PRESETS: dict[str, SkinGPTConfig] = {
    "skingpt4-vicuna7b": SkinGPTConfig(name="skingpt4-vicuna7b", llm=_VICUNA7B_LLM),
    "skingpt4-vicuna13b": SkinGPTConfig(name="skingpt4-vicuna13b", llm=_LLAMA13B_LLM),
    "skingpt4-llama2-13b": SkinGPTConfig(name="skingpt4-llama2-13b", llm=_LLAMA2_13B_LLM),
    "tiny": _TINY,
    "demo": _DEMO,
    "small": _SMALL,
}


assert tuple(sorted(PRESETS)) == tuple(sorted(PRESET_NAMES)), "model.choices.PRESETS names every preset"


def preset(name: str) -> SkinGPTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


# -- helpers ----------------------------------------------------------------------------------

def to_plain(value: Any) -> Any:
    """Tuples become lists so that YAML stays plain."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def dataclass_from_yaml(cls: type, path: str | Path, where: str) -> Any:
    """Read a YAML file into dataclass `cls` strictly; every error names the file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    try:
        return build_dataclass(cls, data or {}, where)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a plain dict with pydantic (nested dataclasses, `Literal` choices,
    tuples of fixed length; unknown keys are errors); every problem named by its dotted path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    try:
        return _adapter(cls).validate_python(data)
    except pydantic.ValidationError as err:
        raise ConfigError(_explain(err.errors(), cls, where)) from None


@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter:
    _forbid_extra(cls)
    return pydantic.TypeAdapter(cls)


def _forbid_extra(cls: type) -> None:
    """Unknown keys are errors in `cls` and every dataclass inside it."""
    cls.__pydantic_config__ = pydantic.ConfigDict(extra="forbid")
    for hint in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(hint):
            _forbid_extra(hint)


_KINDS = {"int": "int", "float": "float", "string": "str", "bool": "true or false", "dict": "a mapping",
          "list": "a list", "tuple": "a list"}


def _explain(errors: list[dict], cls: type, where: str) -> str:
    """pydantic's errors in this project's words: the first one, with the keys it allows."""
    error = errors[0]
    loc = [str(p) for p in error["loc"]]
    kind, value = error["type"], error.get("input")
    names = [p for p in loc if not p.isdigit()]  # the field, without a tuple's item index
    if kind in _UNKNOWN:
        owner = _hint(cls, names[:-1])
        unknown = sorted(str(e["loc"][-1]) for e in errors if e["type"] in _UNKNOWN
                         and [str(p) for p in e["loc"][:-1]] == names[:-1])
        allowed = ", ".join(sorted(f.name for f in dataclasses.fields(owner)))
        return f"unknown key(s) {', '.join(map(repr, unknown))} in {'.'.join([where, *names[:-1]])}; allowed: {allowed}"
    path = ".".join([where, *names])
    if kind == "value_error":  # a rule of the dataclass itself (its __post_init__)
        message = str(error.get("ctx", {}).get("error") or error["msg"]).removeprefix("Value error, ")
        return f"{path}: {message}" if names else f"{where}: {message}"
    if kind == "literal_error":
        return f"{path} must be {error['ctx']['expected']}, got {value!r}"
    hint = _hint(cls, names)
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[-1] is not Ellipsis:
        return f"{path} must be a list of {len(typing.get_args(hint))} numbers, got {value!r}"
    wanted = next((word for prefix, word in _KINDS.items() if kind.startswith(prefix)), None)
    if wanted is not None:
        return f"{path} must be {wanted}, got {value!r}"
    return f"{path}: {error['msg']}"


_UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument")


def _hint(cls: type, names: list[str]) -> Any:
    """The type at a dotted path of fields inside dataclass `cls`."""
    hint: Any = cls
    for name in names:
        if not dataclasses.is_dataclass(hint):
            break
        hint = typing.get_type_hints(hint).get(name, hint)
    return hint
