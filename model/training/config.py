"""A training step as one strict YAML file (validated by pydantic: unknown keys, wrong types and
choices outside a `Literal` are errors naming the field and the file), with the paper's defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from model.nn.config import dataclass_from_yaml, require, to_plain

TRAINABLE = ("proj", "query_tokens", "qformer", "lora")

DEFAULT_PROMPTS = (
    "<Img><ImageHere></Img> Describe the skin condition in this image.",
    "<Img><ImageHere></Img> What do you see on this skin?",
    "<Img><ImageHere></Img> Please describe the lesion in this photo in clinical terms.",
    "<Img><ImageHere></Img> What are the clinical features of this skin problem?",
)


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class StepConfig:
    name: str = "step1"  # step1: concepts and features; step2: diagnosis
    weights: str | None = None  # the bundle to start from (step 2: step 1's bundle); --weights overrides
    epochs: int = 20
    batch_size: int = 2  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 5000
    weight_decay: float = 0.05
    max_steps: int | None = None  # stop early (smoke runs); the schedule still spans all epochs
    max_txt_len: int = 160  # answer tokens kept per sample, as the reference
    template: str = "skingpt4"  # the same templates the engine serves with
    prompts: tuple[str, ...] = DEFAULT_PROMPTS  # instructions for caption records; each has <ImageHere>
    trainable: tuple[str, ...] = ("proj",)
    lora: LoraConfig = field(default_factory=LoraConfig)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    grad_checkpointing: bool = False
    save_every: int = 1000  # optimizer steps between checkpoints
    log_every: int = 10
    seed: int = 42
    num_workers: int = 0
    split: str | None = "train"  # records whose split differs are left out; None: all
    skip_bad_records: bool = True  # False: any bad record stops before training starts

    def __post_init__(self) -> None:
        require(self.epochs > 0 and self.batch_size > 0 and self.grad_accum > 0, "epochs, batch_size and "
                 "grad_accum must be positive")
        require(self.lr > 0 and self.min_lr >= 0 and self.warmup_steps >= 0, "learning rates must be positive")
        unknown = sorted(set(self.trainable) - set(TRAINABLE))
        require(not unknown, f"trainable: unknown part(s) {unknown}; choose from {', '.join(TRAINABLE)}")
        require(bool(self.trainable), "trainable: name at least one part")
        require(bool(self.prompts) and all("<ImageHere>" in p for p in self.prompts),
                 "every prompt must contain <ImageHere> (where the image goes)")

    @classmethod
    def from_yaml(cls, path: str | Path) -> StepConfig:
        return dataclass_from_yaml(cls, path, "step")

    def to_dict(self) -> dict:
        import dataclasses

        return to_plain(dataclasses.asdict(self))
