"""Two-step fine-tuning on CPU: label masking, overfitting, exact resume, torchrun equivalence,
bundles the engine serves, and clear messages for bad data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, _free_port
from model.weights.bundle import load_bundle
from model.prompt.conversation import TEMPLATES, Conversation, ImageInput, render, template, training_segments
from tools.fixtures import write_training_data
from model.training.config import StepConfig
from model.training.data import Collator, DataError, TrainDataset, load_samples, read_records
from model.training.loop import train

QUIET = {"say": lambda _: None}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_training_data(tmp_path_factory.mktemp("data"), n=8)


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _step(**kw) -> StepConfig:
    base = dict(epochs=50, batch_size=4, lr=3e-3, min_lr=1e-4, warmup_lr=1e-4, warmup_steps=2, log_every=1,
                save_every=1000, max_txt_len=40)
    return StepConfig(**{**base, **kw})


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_training_text_is_what_the_engine_shows(name):
    tpl = template(name)
    image = ImageInput(image=None, key="k")
    conversation = Conversation().ask("Describe it.", [image]).answer("A red plaque.").ask("Cause?").answer("Psoriasis.")
    pieces = training_segments(tpl, conversation)
    assert render(tpl, conversation.ask("More?")).startswith("".join(text for text, _ in pieces))
    assert [t for _, t in pieces] == [False, True, False, True]
    assert pieces[1][0].strip().startswith("A red plaque.") and pieces[1][0].endswith(tpl.stop[0])


def test_labels_cover_only_answers_and_separators(tiny_bundle, data):
    loaded = load_bundle(tiny_bundle)
    tok = loaded.tokenizer
    samples = load_samples(data, "train", True, say=lambda _: None)
    dataset = TrainDataset(samples, loaded.config.preprocess, StepConfig().prompts, seed=0)
    collate = Collator(tok, template("skingpt4"), "<ImageHere>", 32, max_txt_len=160)
    batch = collate([dataset[0], dataset[1]])
    for row in range(2):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        kept = labels[labels != -100].tolist()
        assert tok.decode(kept) == samples[row].record.caption + "###"
        assert (labels[ids < 0] == -100).all() and (ids < 0).sum() == 32  # image slots never carry loss
        assert labels[0] == -100 and ids[0] == tok.bos_token_id
        answer_start = (labels != -100).nonzero()[0].item()
        assert tok.decode(ids[:answer_start][ids[:answer_start] >= 0].tolist()).endswith("###Assistant:")
    # padding carries no loss, and the attention mask covers exactly the real tokens
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()

    turns = Conversation().ask("What is it?", [ImageInput(None, "k")]).answer("Acne.").ask("Cause?").answer("Hormones.")
    ids, labels = collate.encode(turns)
    assert tok.decode([x for x in labels if x != -100]) == "Acne.### Hormones.###"
    truncated = Collator(tok, template("skingpt4"), "<ImageHere>", 32, max_txt_len=3).encode(turns)[1]
    assert sum(x != -100 for x in truncated) == 3


def test_tiny_model_overfits_and_the_bundle_is_served(tiny_bundle, data, tmp_path):
    from model.serving.engine import Engine

    cfg = _step(epochs=200, lr=1e-2, min_lr=1e-3, warmup_lr=1e-3, warmup_steps=10, log_every=20, max_steps=200,
                trainable=("proj", "lora"))
    cfg = _with_lora(cfg)
    bundle = train(cfg, data, tmp_path / "run", tiny_bundle, **QUIET)
    losses = [m["loss"] for m in _metrics(tmp_path / "run")]
    assert losses[-1] < losses[0] / 10, losses

    engine = Engine(load_bundle(bundle))  # the same bundle format `launch.py --weights` serves
    image = ImageInput.of(Image.open(data.parent / "image" / "3.jpg").convert("RGB"))
    answer = engine.answer(Conversation().ask("Describe the skin condition in this image.", [image]),
                           do_sample=False, max_new_tokens=30)
    assert answer.startswith("The photo shows") and answer.endswith(".")
    manifest = load_bundle(bundle).manifest
    assert manifest["sources"]["trained_from"]["sha256"] == load_bundle(tiny_bundle).bundle_hash


def _with_lora(cfg: StepConfig) -> StepConfig:
    from dataclasses import replace

    from model.training.config import LoraConfig

    # the tiny random LM's frozen output layer bounds its logits; letting LoRA adapt it too makes
    # memorising possible, as a real LM's trained head already is
    return replace(cfg, lora=LoraConfig(r=16, alpha=32, dropout=0.0,
                                        target_modules=("q_proj", "v_proj", "up_proj", "down_proj", "lm_head")))


def test_resume_repeats_the_uninterrupted_run(tiny_bundle, data, tmp_path):
    cfg = _step(max_steps=10, save_every=3, batch_size=3, trainable=("proj", "query_tokens"))
    train(cfg, data, tmp_path / "whole", tiny_bundle, **QUIET)
    from dataclasses import replace

    train(replace(cfg, max_steps=4), data, tmp_path / "split", tiny_bundle, **QUIET)  # stops mid-epoch
    train(cfg, data, tmp_path / "split", tiny_bundle, resume=True, **QUIET)
    whole, split = _metrics(tmp_path / "whole"), _metrics(tmp_path / "split")
    assert [m["step"] for m in split] == list(range(1, 11))
    assert [m["loss"] for m in split] == [m["loss"] for m in whole]
    a = load_file(str(tmp_path / "whole" / "bundle" / "encoder.safetensors"))
    b = load_file(str(tmp_path / "split" / "bundle" / "encoder.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["proj.weight"], load_file(str(tiny_bundle / "encoder.safetensors"))["proj.weight"])


def test_resume_with_different_data_is_refused(tiny_bundle, tmp_path):
    """The data order is part of the checkpoint: a resume over changed data would not be the same run."""
    from model.training.loop import TrainingError

    manifest = write_training_data(tmp_path / "data", n=8)
    cfg = _step(max_steps=2, save_every=1, batch_size=3, trainable=("proj",))
    train(cfg, manifest, tmp_path / "run", tiny_bundle, **QUIET)
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same records, another order
    with pytest.raises(TrainingError, match="training data differs"):
        train(replace(cfg, max_steps=4), manifest, tmp_path / "run", tiny_bundle, resume=True, **QUIET)


def test_checkpoint_keeps_each_rank_data_order_and_random_state(tiny_bundle, data, tmp_path):
    cfg = _step(max_steps=2, save_every=1, batch_size=3, trainable=("proj",))
    train(cfg, data, tmp_path / "run", tiny_bundle, **QUIET)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step-0000001" / "rank-0.pt", weights_only=True)
    assert sorted(i for batch in saved["batches"] for i in batch) == list(range(8))  # the epoch's whole order
    assert set(saved["rng"]) == {"cpu"} and saved["rng"]["cpu"].dtype == torch.uint8  # no GPU here: no CUDA state


def test_cuda_random_state_is_saved_and_restored(monkeypatch):
    """What a GPU run's dropout draws from goes into the checkpoint and comes back on resume."""
    from model.training import loop

    devices = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5, 6], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [d.clone() for d in devices])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    state = loop.rng_state()
    assert [s.tolist() for s in state["cuda"]] == [[1, 2, 3], [4, 5, 6]]
    torch.rand(3)  # the CPU state moves on ...
    loop.restore_rng(state)
    assert torch.equal(torch.get_rng_state(), state["cpu"])  # ... and comes back
    assert [s.tolist() for s in restored] == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(loop.TrainingError, match="written without a GPU"):
        loop.restore_rng({"cpu": state["cpu"]})


@pytest.mark.gpu
def test_resume_on_gpu_repeats_the_uninterrupted_run(tiny_bundle, data, tmp_path):
    """Dropout on the GPU draws from the CUDA generator: a resume must restore it too."""
    cfg = _with_lora(_step(max_steps=8, save_every=3, batch_size=3, trainable=("proj", "lora"), precision="fp32"))
    cfg = replace(cfg, lora=replace(cfg.lora, dropout=0.3))
    train(cfg, data, tmp_path / "whole", tiny_bundle, **QUIET)
    train(replace(cfg, max_steps=4), data, tmp_path / "split", tiny_bundle, **QUIET)
    train(cfg, data, tmp_path / "split", tiny_bundle, resume=True, **QUIET)
    assert [m["loss"] for m in _metrics(tmp_path / "split")] == [m["loss"] for m in _metrics(tmp_path / "whole")]


def test_torchrun_two_processes_match_one(tiny_bundle, data, tmp_path):
    config = tmp_path / "step.yaml"
    common = {"epochs": 5, "lr": 3.0e-3, "min_lr": 1.0e-4, "warmup_lr": 1.0e-4, "warmup_steps": 2,
              "log_every": 1, "max_txt_len": 40, "max_steps": 4, "trainable": ["proj", "query_tokens"]}
    config.write_text(json.dumps({**common, "batch_size": 2}))  # JSON is YAML
    single = tmp_path / "single.yaml"
    single.write_text(json.dumps({**common, "batch_size": 4}))
    args = ["launch.py", "train", "--data", str(data), "--weights", str(tiny_bundle)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--config", str(single), "--out", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", *args, "--config", str(config), "--out", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    a = load_file(str(tmp_path / "one" / "bundle" / "encoder.safetensors"))
    b = load_file(str(tmp_path / "two" / "bundle" / "encoder.safetensors"))
    for key in ("proj.weight", "proj.bias", "query_tokens"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    start = load_file(str(tiny_bundle / "encoder.safetensors"))
    assert (a["proj.weight"] - start["proj.weight"]).abs().max() > 1e-3  # it did train
    losses = [m["loss"] for m in _metrics(tmp_path / "one")], [m["loss"] for m in _metrics(tmp_path / "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_bad_records_are_named_with_file_and_line(tmp_path):
    write_training_data(tmp_path, n=2)
    manifest = tmp_path / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    lines += ['{"image": "image/missing.jpg", "caption": "Gone."}',
              '{"image": "image/0.jpg", "caption": "broken',
              '{"image": "image/1.jpg", "caption": "   "}',
              '{"image": "image/1.jpg", "caption": "x", "turns": [{"question": "q", "answer": "a"}]}',
              '{"image": "image/1.jpg", "caption": "x", "fitzpatrick": 7}',
              '{"image": "image/1.jpg", "caption": "x", "colour": "red"}']
    manifest.write_text("\n".join(lines) + "\n")
    (tmp_path / "image" / "bad.jpg").write_bytes(b"not a jpeg")
    with open(manifest, "a") as handle:
        handle.write('{"image": "image/bad.jpg", "caption": "Unreadable."}\n')
    with pytest.raises(DataError) as err:
        load_samples(manifest, "train", skip_bad=False, say=lambda _: None)
    message = str(err.value)
    assert "7 bad record(s)" in message
    assert f"{manifest}:3: image image/missing.jpg not found" in message
    assert f"{manifest}:4: not valid JSON (Unterminated string starting at, column 37)" in message
    assert f"{manifest}:5: record: caption has no text" in message
    assert f"{manifest}:6: record: give either a caption or a list of turns" in message
    assert f"{manifest}:7: fitzpatrick" in message and f"{manifest}:8: colour: Extra inputs" in message
    assert f"{manifest}:9: image image/bad.jpg cannot be read" in message
    said = []
    samples = load_samples(manifest, "train", skip_bad=True, say=said.append)
    assert len(samples) == 2 and "skipping 7 bad record(s)" in said[0]


def test_reference_layout_and_its_problems(tmp_path):
    write_training_data(tmp_path, n=3, layout="reference")
    samples, problems = read_records(tmp_path)
    assert len(samples) == 3 and not problems and samples[0].image_path == tmp_path / "image" / "0.jpg"
    data = json.loads((tmp_path / "filter_cap.json").read_text())
    data["annotations"].append({"caption": "no id"})
    data["annotations"].append({"image_id": "9", "caption": ""})
    (tmp_path / "filter_cap.json").write_text(json.dumps(data))
    _, problems = read_records(tmp_path)
    assert [str(p).split(": ", 1)[1] for p in problems] == ["needs image_id and caption", "record: caption has no text"]
    assert str(problems[0]).startswith(f"{tmp_path / 'filter_cap.json'}#annotation 3")
    with pytest.raises(DataError, match="holds no training data"):
        read_records(tmp_path / "image")


def test_step_configs_are_strict(tmp_path):
    assert StepConfig.from_yaml(ROOT / "configs" / "step1.yaml").lr == 1e-4
    assert StepConfig.from_yaml(ROOT / "configs" / "step2.yaml").weights == "runs/step1/bundle"
    defaults = StepConfig()
    assert (defaults.epochs, defaults.batch_size, defaults.lr, defaults.weight_decay) == (20, 2, 1e-4, 0.05)
    from model.nn.config import ConfigError

    (tmp_path / "s.yaml").write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'learning_rate' in step"):
        StepConfig.from_yaml(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("trainable: [proj, vit]\n")
    with pytest.raises(ConfigError, match="unknown part"):
        StepConfig.from_yaml(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("prompts: ['Describe this.']\n")
    with pytest.raises(ConfigError, match="<ImageHere>"):
        StepConfig.from_yaml(tmp_path / "s.yaml")


def test_training_sees_a_phone_photo_as_serving_does(tmp_path, tiny_bundle):
    """An EXIF-rotated, ICC-tagged JPEG: the pixels a training sample carries are the pixels serving
    feeds the model (upright, in sRGB), not the file's raw sideways numbers."""
    from model.images.decode import decode_photo
    from model.images.preprocess import preprocess
    from test_imageio import _swapped_primaries_profile

    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    raw = Image.new("RGB", (64, 32), (220, 30, 30))
    raw.paste((30, 30, 220), (0, 0, 16, 32))  # a blue band on the stored image's left
    (tmp_path / "image").mkdir()
    raw.save(tmp_path / "image" / "phone.jpg", "JPEG", quality=95, exif=exif.tobytes(),
             icc_profile=_swapped_primaries_profile())
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"image": "image/phone.jpg", "caption": "A red plaque."}) + "\n")
    cfg = load_bundle(tiny_bundle).config.preprocess
    dataset = TrainDataset(load_samples(manifest, None, False, **QUIET), cfg, StepConfig().prompts, seed=0)
    dataset.transform = lambda image: preprocess(image, cfg)  # the inference transform: no random crop
    served = preprocess(decode_photo((tmp_path / "image" / "phone.jpg").read_bytes()).image, cfg)
    assert torch.equal(dataset[0]["pixels"], served)
    bare = preprocess(Image.open(tmp_path / "image" / "phone.jpg"), cfg)  # what training used to see
    assert not torch.allclose(bare, served, atol=0.1)


def test_training_refuses_a_photo_serving_would_refuse(tmp_path):
    (tmp_path / "image").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "image" / "scan.eps", "EPS")  # a format that runs Ghostscript
    Image.new("RGB", (32, 32), (200, 90, 90)).save(tmp_path / "image" / "ok.png")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"image/{n}", "caption": "x"}) + "\n" for n in ("scan.eps", "ok.png")))
    with pytest.raises(DataError, match=r"scan\.eps cannot be read: .*not a photo this app can read"):
        load_samples(manifest, None, False, **QUIET)
    assert [s.record.image for s in load_samples(manifest, None, True, **QUIET)] == ["image/ok.png"]
