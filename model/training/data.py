"""Training data: two layouts, validated before training starts, and a collator that masks labels.

Layouts:
- the reference's: DIR/image/{image_id}.jpg and DIR/filter_cap.json
  ({"annotations": [{"image_id": ..., "caption": ...}]});
- a JSONL manifest (a .jsonl file, or DIR/manifest.jsonl), one record a line:
  {"image": "path/relative/to/manifest.jpg", "caption": "..."} or {"image": ..., "turns":
  [{"question": ..., "answer": ...}]}, optionally "diagnosis", "concepts", "fitzpatrick" (1-6 or
  I-VI), "split", "id".
A bad record is reported with its file and line; it is skipped (and counted) or stops the run.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from model.prompt.conversation import Conversation, ImageInput, training_segments
from model.errors import UserFacingError
from model.images.decode import ImageError, check_photo_file, read_image_file
from model.images.preprocess import train_transform
from model.clinical.records import SkinTyped, read_jsonl, validation_message
from model.nn.skingpt import IMAGE_TOKEN_ID, tokenize_prompt

IMAGE_MARKER = "<Img><ImageHere></Img>"


class DataError(UserFacingError, ValueError):
    """Training data that cannot be used as it is."""


class ChatTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    answer: str

    @field_validator("question", "answer")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()


class Record(SkinTyped):
    image: str
    caption: str | None = None
    turns: list[ChatTurn] | None = None
    diagnosis: str | None = None
    concepts: list[str] | None = None
    split: str | None = None
    id: str | None = None

    @model_validator(mode="after")
    def _one_target(self) -> Record:
        if self.caption is not None and not self.caption.strip():
            raise ValueError("caption has no text")
        if (self.caption is None) == (self.turns is None):
            raise ValueError("give either a caption or a list of turns (not both, not neither)")
        if self.turns is not None and not self.turns:
            raise ValueError("turns is empty")
        return self


@dataclass(frozen=True)
class Problem:
    where: str  # file:line, or file#annotation
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Sample:
    record: Record
    image_path: Path
    where: str


def read_records(path: str | Path) -> tuple[list[Sample], list[Problem]]:
    """Parse and validate every record of either layout; images are not opened yet."""
    path = Path(path)
    if path.is_file() and path.suffix == ".jsonl":
        return _read_manifest(path)
    if (path / "manifest.jsonl").is_file():
        return _read_manifest(path / "manifest.jsonl")
    if (path / "filter_cap.json").is_file():
        return _read_reference(path)
    raise DataError(f"{path} holds no training data: expected a .jsonl manifest, DIR/manifest.jsonl, or the "
                    f"reference layout DIR/filter_cap.json with DIR/image/")


def _read_manifest(path: Path) -> tuple[list[Sample], list[Problem]]:
    records, problems = read_jsonl(path, Record)
    samples = [Sample(record, (path.parent / record.image).resolve(), where) for where, record in records]
    return samples, [Problem(where, message) for where, message in problems]


def _read_reference(root: Path) -> tuple[list[Sample], list[Problem]]:
    file = root / "filter_cap.json"
    try:
        annotations = json.loads(file.read_text())["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{file} must be JSON of the form {{\"annotations\": [{{\"image_id\": ..., "
                        f"\"caption\": ...}}]}} ({err})") from err
    samples, problems = [], []
    for number, item in enumerate(annotations):
        where = f"{file}#annotation {number}"
        try:
            image_id = item["image_id"]
            record = Record(image=f"image/{image_id}.jpg", caption=item.get("caption"), id=str(image_id))
        except (KeyError, TypeError):
            problems.append(Problem(where, "needs image_id and caption"))
            continue
        except ValidationError as err:
            problems.append(Problem(where, validation_message(err)))
            continue
        samples.append(Sample(record, root / record.image, where))
    return samples, problems


def check_images(samples: list[Sample]) -> tuple[list[Sample], list[Problem]]:
    """Open every image header now, so that a bad file is found before step 1, not at step 9000."""
    good, problems = [], []
    for sample in samples:
        if not sample.image_path.is_file():
            problems.append(Problem(sample.where, f"image {sample.record.image} not found ({sample.image_path})"))
            continue
        try:
            check_photo_file(sample.image_path)
        except ImageError as err:
            problems.append(Problem(sample.where, f"image {sample.record.image} cannot be read: {err}"))
            continue
        good.append(sample)
    return good, problems


def load_samples(path: str | Path, split: str | None, skip_bad: bool, say=print) -> list[Sample]:
    samples, problems = read_records(path)
    samples, image_problems = check_images(samples)
    problems += image_problems
    if split is not None:
        samples = [s for s in samples if s.record.split in (None, split)]
    if problems:
        listing = "\n".join(f"  {p}" for p in problems[:20]) + (f"\n  ... and {len(problems) - 20} more"
                                                                 if len(problems) > 20 else "")
        if not skip_bad:
            raise DataError(f"{len(problems)} bad record(s) in {path}; fix them or set skip_bad_records: "
                            f"true\n{listing}")
        say(f"skipping {len(problems)} bad record(s) in {path}:\n{listing}")
    if not samples:
        raise DataError(f"no usable training records in {path}")
    return samples


class TrainDataset(torch.utils.data.Dataset):
    """Images with their conversations. The augmentation and prompt choice of sample i in epoch e
    depend only on (seed, e, i): any process, any resume point, sees the same sample."""

    def __init__(self, samples: list[Sample], preprocess_cfg, prompts: tuple[str, ...], seed: int) -> None:
        self.samples, self.prompts, self.seed = samples, prompts, seed
        self.transform = train_transform(preprocess_cfg)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        key = (self.seed * 1_000_003 + self.epoch * 7_919 + index) % 2**63
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key)
            pixels = self.transform(read_image_file(sample.image_path))  # decoded as serving decodes it
        return {"pixels": pixels, "conversation": self._conversation(sample.record, random.Random(key))}

    def _conversation(self, record: Record, rng: random.Random) -> Conversation:
        image = ImageInput(image=None, key="training")  # the pixels travel apart; the key is unused here
        if record.caption is not None:
            question = rng.choice(self.prompts).replace(IMAGE_MARKER, "").strip()
            return Conversation().ask(question, [image]).answer(record.caption.strip())
        conversation = Conversation()
        for n, turn in enumerate(record.turns):
            conversation = conversation.ask(turn.question.replace(IMAGE_MARKER, "").strip(),
                                            [image] if n == 0 else []).answer(turn.answer)
        return conversation


class Collator:
    """Conversations -> padded ids with image runs, attention mask, and labels that are -100
    everywhere but on answer tokens and the stop string after each answer."""

    def __init__(self, tokenizer, template, placeholder: str, num_query_tokens: int, max_txt_len: int) -> None:
        self.tokenizer, self.template = tokenizer, template
        self.placeholder, self.q, self.max_txt_len = placeholder, num_query_tokens, max_txt_len

    def encode(self, conversation: Conversation) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        budget = self.max_txt_len
        for n, (text, target) in enumerate(training_segments(self.template, conversation)):
            if target:
                piece = self.tokenizer(text, add_special_tokens=False).input_ids[:max(budget, 0)]
                budget -= len(piece)
                ids += piece
                labels += piece
            else:
                piece = tokenize_prompt(self.tokenizer, text, self.placeholder, self.q, add_bos=n == 0)
                ids += piece
                labels += [-100] * len(piece)
        return ids, labels

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(item["conversation"]) for item in batch]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, labs) in enumerate(encoded):  # right padding
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(labs)] = torch.tensor(labs)
            mask[row, :len(ids)] = 1
        assert not (labels == IMAGE_TOKEN_ID).any()
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "pixels": torch.stack([item["pixels"] for item in batch])}
