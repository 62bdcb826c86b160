"""Tiny weight files in the published formats, for tests and for the demo bundle.

The source tensors are drawn from explicit shape specs written in the *source* formats' own names
(LAVIS, Hugging Face BLIP-2, Hugging Face Llama, SkinGPT-4 / MiniGPT-4), not from our modules, so
that converting them exercises the real key maps. Weights are random: a bundle made from them
loads and runs but means nothing.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.nn.config import SkinGPTConfig, preset

# A small original text, enough to train a byte-fallback BPE tokenizer with the template's markers.
_CORPUS = """\
###Human: <Img><ImageHere></Img> Describe the skin condition in this photo. ###Assistant: The image shows
a well demarcated erythematous plaque with silvery scale on the extensor surface of the elbow.
###Human: What other features do you see? ###Assistant: There are small papules at the edge, mild
excoriation, and no ulceration. The border is regular and the colour is uniform pink to red.
###Human: What could cause this? ###Assistant: Plaque psoriasis is an immune mediated condition; triggers
include stress, infection, skin injury and some medicines. Eczema and fungal infection are differentials.
###Human: How is it treated? ###Assistant: Emollients, topical corticosteroids and vitamin D analogues
are first line. Phototherapy or systemic treatment may help widespread disease. See a dermatologist.
### Instruction: Is this mole dangerous? ### Response: An asymmetric lesion with an irregular border,
several colours, a diameter over six millimetres or recent change should be checked by a doctor soon.
Acne, rosacea, dermatitis, urticaria, melanoma, nevus, basal cell carcinoma, squamous cell carcinoma,
seborrheic keratosis, tinea, candidiasis, impetigo, cellulitis, herpes simplex, herpes zoster, scabies,
lupus, vitiligo, lichen planus, bullous pemphigoid, pemphigus, warts, molluscum, hemangioma, keloid.
Macule, patch, papule, plaque, nodule, vesicle, bulla, pustule, erosion, ulcer, crust, scale, atrophy,
lichenification, hyperpigmentation, hypopigmentation, telangiectasia, purpura, comedo, wheal, scar.
Erythema, induration, pruritus, burning, pain, bleeding, oozing, rapid growth, itching at night.
This is decision support, not a diagnosis. Please consult a qualified clinician for medical advice.
The lesion appears on the face, scalp, trunk, arms, legs, hands, feet, nails or mucous membranes.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 24 48 100. Punctuation: , . ; : ! ? ( ) [ ] " ' - / % + = < > #
"""


@dataclass(frozen=True)
class SourceFiles:
    """Paths of one set of tiny source files, each in a published format."""

    vit: Path  # eva_vit_g.pth: LAVIS ViT state dict, one block more than the model uses
    blip2: Path  # blip2_pretrained_flant5xxl.pth: {"model": Qformer.bert.*, query_tokens, ln_vision, ...}
    hf_blip2: Path  # a transformers BLIP-2 directory (model.safetensors)
    llm: Path  # Hugging Face Llama directory, safetensors, SentencePiece tokenizer.model
    llm_bin: Path  # the same LLM with a pytorch_model.bin pickle instead of safetensors
    finetune: Path  # skinGPT_v1.pth: {"model": {"llama_proj.*"}}
    finetune_llm_proj: Path  # a later SkinGPT-4 file: {"model": {"llm_proj.*"}}


class _Random:
    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def weight(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * 0.05

    def bias(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * 0.02

    def norm(self, n: int) -> torch.Tensor:
        return 1.0 + torch.randn(n, generator=self.gen) * 0.1


def lavis_vit_state(cfg: SkinGPTConfig, rng: _Random) -> dict[str, torch.Tensor]:
    """EVA ViT in LAVIS names, with depth + 1 blocks as the published file has."""
    v = cfg.vision
    c, hidden, n_tok = v.embed_dim, int(v.embed_dim * v.mlp_ratio), v.num_tokens
    state = {"cls_token": rng.weight(1, 1, c), "pos_embed": rng.weight(1, n_tok, c),
             "patch_embed.proj.weight": rng.weight(c, 3, v.patch_size, v.patch_size),
             "patch_embed.proj.bias": rng.bias(c)}
    for i in range(v.depth + 1):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": rng.norm(c), b + "norm1.bias": rng.bias(c),
            b + "attn.q_bias": rng.bias(c), b + "attn.v_bias": rng.bias(c),
            b + "attn.qkv.weight": rng.weight(3 * c, c),
            b + "attn.proj.weight": rng.weight(c, c), b + "attn.proj.bias": rng.bias(c),
            b + "norm2.weight": rng.norm(c), b + "norm2.bias": rng.bias(c),
            b + "mlp.fc1.weight": rng.weight(hidden, c), b + "mlp.fc1.bias": rng.bias(hidden),
            b + "mlp.fc2.weight": rng.weight(c, hidden), b + "mlp.fc2.bias": rng.bias(c),
        })
    return state


def lavis_blip2_state(cfg: SkinGPTConfig, rng: _Random) -> dict[str, torch.Tensor]:
    """BLIP-2 `model` entry in LAVIS names, the unused text branch and T5 projection included."""
    q, c_vis = cfg.qformer, cfg.vision.embed_dim
    h, inter = q.hidden_size, q.intermediate_size
    pre = "Qformer.bert."
    state = {"ln_vision.weight": rng.norm(c_vis), "ln_vision.bias": rng.bias(c_vis),
             "query_tokens": rng.weight(1, q.num_query_tokens, h),
             pre + "embeddings.LayerNorm.weight": rng.norm(h), pre + "embeddings.LayerNorm.bias": rng.bias(h),
             pre + "embeddings.position_ids": torch.arange(q.max_position_embeddings).unsqueeze(0),
             pre + "embeddings.word_embeddings.weight": rng.weight(100, h),
             pre + "embeddings.position_embeddings.weight": rng.weight(q.max_position_embeddings, h),
             "t5_proj.weight": rng.weight(16, h), "t5_proj.bias": rng.bias(16)}

    def linear(name: str, out_f: int, in_f: int) -> None:
        state[name + ".weight"], state[name + ".bias"] = rng.weight(out_f, in_f), rng.bias(out_f)

    def norm(name: str) -> None:
        state[name + ".weight"], state[name + ".bias"] = rng.norm(h), rng.bias(h)

    for i in range(q.num_layers):
        layer = f"{pre}encoder.layer.{i}."
        for kind, kv_in in [("attention", h)] + ([("crossattention", c_vis)] if i % q.cross_attention_frequency == 0 else []):
            linear(layer + f"{kind}.self.query", h, h)
            linear(layer + f"{kind}.self.key", h, kv_in)
            linear(layer + f"{kind}.self.value", h, kv_in)
            linear(layer + f"{kind}.output.dense", h, h)
            norm(layer + f"{kind}.output.LayerNorm")
        for branch in ("", "_query"):  # the text FFN ("") is unused by the queries
            linear(layer + f"intermediate{branch}.dense", inter, h)
            linear(layer + f"output{branch}.dense", h, inter)
            norm(layer + f"output{branch}.LayerNorm")
    return state


def lavis_to_hf_blip2(vit: dict[str, torch.Tensor], blip2: dict[str, torch.Tensor], depth: int
                      ) -> dict[str, torch.Tensor]:
    """The same tensors as a transformers BLIP-2 checkpoint names them (39-layer vision tower)."""
    out = {"vision_model.embeddings.class_embedding": vit["cls_token"],
           "vision_model.embeddings.position_embedding": vit["pos_embed"],
           "vision_model.embeddings.patch_embedding.weight": vit["patch_embed.proj.weight"],
           "vision_model.embeddings.patch_embedding.bias": vit["patch_embed.proj.bias"],
           "vision_model.post_layernorm.weight": blip2["ln_vision.weight"],
           "vision_model.post_layernorm.bias": blip2["ln_vision.bias"],
           "query_tokens": blip2["query_tokens"],
           "language_projection.weight": blip2["t5_proj.weight"], "language_projection.bias": blip2["t5_proj.bias"]}
    hf_block = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                "attn.q_bias": "self_attn.q_bias", "attn.v_bias": "self_attn.v_bias",
                "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for key, value in vit.items():
        if key.startswith("blocks.") and int(key.split(".")[1]) < depth:
            _, index, rest = key.split(".", 2)
            stem = next(s for s in hf_block if rest == s or rest.startswith(s + "."))
            out[f"vision_model.encoder.layers.{index}.{hf_block[stem]}{rest[len(stem):]}"] = value
    for key, value in blip2.items():
        if not key.startswith("Qformer.bert."):
            continue
        rest = key.removeprefix("Qformer.bert.")
        if rest.startswith("embeddings.LayerNorm."):
            out["qformer.layernorm." + rest.rsplit(".", 1)[1]] = value
        elif rest.startswith("encoder.layer.") and not re.match(r"encoder\.layer\.\d+\.(intermediate|output)\.", rest):
            rest = rest.replace(".crossattention.self.", ".crossattention.attention.")
            out["qformer." + rest.replace(".attention.self.", ".attention.attention.")] = value
    return out


def train_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A real SentencePiece BPE model with byte fallback and Llama's special ids, trained offline."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines()), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, split_digits=True, normalization_rule_name="identity",
        num_threads=1, minloglevel=2)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048, "legacy": False}, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))


def write_llm_dir(out_dir: Path, cfg: SkinGPTConfig, seed: int, pickle: bool = False) -> None:
    """A Llama directory as Vicuna ships it: legacy config.json, tokenizer.model, weight shards."""
    from model.nn.llm import build_llm

    out_dir.mkdir(parents=True, exist_ok=True)
    llm = cfg.llm
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in build_llm(llm).state_dict().items()}
    (out_dir / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
        "max_position_embeddings": llm.max_position_embeddings, "rms_norm_eps": llm.rms_norm_eps,
        "bos_token_id": llm.bos_token_id, "eos_token_id": llm.eos_token_id, "pad_token_id": 0,
        "initializer_range": 0.02, "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
    }, indent=2))
    if pickle:
        torch.save(state, out_dir / "pytorch_model.bin")
    else:
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    train_tokenizer(out_dir, llm.vocab_size)


def write_sources(out: str | Path, preset_name: str = "tiny", seed: int = 0) -> SourceFiles:
    """Write one set of source files for `preset_name` under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = preset(preset_name)
    rng = _Random(seed)
    vit, blip2 = lavis_vit_state(cfg, rng), lavis_blip2_state(cfg, rng)
    files = SourceFiles(vit=out / "eva_vit_g.pth", blip2=out / "blip2_pretrained_flant5xxl.pth",
                        hf_blip2=out / "blip2-hf", llm=out / "vicuna", llm_bin=out / "vicuna-bin",
                        finetune=out / "skinGPT_v1.pth", finetune_llm_proj=out / "skingpt4_llama2_13bchat.pth")
    torch.save(vit, files.vit)
    torch.save({"model": blip2}, files.blip2)
    files.hf_blip2.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in lavis_to_hf_blip2(vit, blip2, cfg.vision.depth).items()},
              str(files.hf_blip2 / "model.safetensors"), metadata={"format": "pt"})
    (files.hf_blip2 / "config.json").write_text(json.dumps({"model_type": "blip-2",
                                                             "num_query_tokens": cfg.qformer.num_query_tokens}))
    write_llm_dir(files.llm, cfg, seed)
    write_llm_dir(files.llm_bin, cfg, seed, pickle=True)
    proj_w, proj_b = rng.weight(cfg.llm.hidden_size, cfg.qformer.hidden_size), rng.bias(cfg.llm.hidden_size)
    torch.save({"model": {"llama_proj.weight": proj_w, "llama_proj.bias": proj_b}, "epoch": 4}, files.finetune)
    torch.save({"model": {"llm_proj.weight": proj_w, "llm_proj.bias": proj_b}}, files.finetune_llm_proj)
    return files


def write_demo_bundle(out: str | Path, preset_name: str = "demo", seed: int = 0) -> Path:
    """Generate demo-size source files and convert them into a bundle through the real converter."""
    import tempfile

    from model.weights.convert import Sources, convert

    with tempfile.TemporaryDirectory(prefix="skingpt-demo-sources-") as tmp:
        files = write_sources(tmp, preset_name, seed)
        sources = Sources(llm_dir=files.llm, vit=files.vit, blip2=files.blip2, finetune=files.finetune)
        convert(sources, out, preset_name=preset_name, log=lambda _: None)
    return Path(out)


def write_training_data(out: str | Path, n: int = 8, size: int = 64, seed: int = 0, layout: str = "jsonl") -> Path:
    """A tiny training set: n distinct synthetic photos with short captions, as a JSONL manifest
    (returns its path) or in the reference layout (returns the directory)."""
    import numpy as np
    from PIL import Image

    out = Path(out)
    (out / "image").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = ["red plaque with scale", "brown macule regular border", "papules and pustules on the face",
             "vesicles in a cluster", "white patch without scale", "dark nodule irregular border",
             "wheals on the trunk", "crusted erosion on the lip"]
    records = []
    for i in range(n):
        colour = rng.integers(0, 256, 3)
        pixels = np.clip(rng.normal(colour, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(out / "image" / f"{i}.jpg")
        records.append({"image": f"image/{i}.jpg", "caption": f"The photo shows {words[i % len(words)]}.",
                        "fitzpatrick": int(i % 6) + 1, "id": str(i)})
    if layout == "reference":
        annotations = [{"image_id": r["id"], "caption": r["caption"]} for r in records]
        (out / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
        return out
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


# Conditions of the synthetic labelled set: each its own colour and texture, so that a head on even
# random features can tell them apart (as real conditions differ in colour and texture).
LABELLED_LOOKS = {
    "psoriasis": ((200, 70, 70), "scale"),  # red plaque with white flecks
    "vitiligo": ((235, 215, 200), "smooth"),  # pale patch
    "melanoma": ((70, 45, 35), "blotch"),  # dark, irregular
    "eczema": ((215, 120, 120), "grain"),  # pink, rough
}


def write_labelled_images(out: str | Path, per_class: int = 60, size: int = 48, seed: int = 0) -> Path:
    """A labelled synthetic image set as a training manifest (diagnosis and split per record):
    60% train, 20% val, 20% test of each condition. Returns the manifest's path."""
    import numpy as np
    from PIL import Image

    out = Path(out)
    (out / "image").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    skin = np.array([225, 180, 155], dtype=float)
    lines = []
    for label, (colour, texture) in LABELLED_LOOKS.items():
        for i in range(per_class):
            pixels = np.clip(rng.normal(skin, 10, (size, size, 3)), 0, 255)
            yy, xx = np.mgrid[:size, :size]
            radius = size * rng.uniform(0.25, 0.4)
            lesion = (yy - size / 2 + rng.normal(0, 3)) ** 2 + (xx - size / 2 + rng.normal(0, 3)) ** 2 < radius ** 2
            tone = np.clip(np.array(colour) + rng.normal(0, 12, 3), 0, 255)
            pixels[lesion] = tone + rng.normal(0, {"grain": 30, "blotch": 20}.get(texture, 6), (lesion.sum(), 3))
            if texture == "scale":
                flecks = lesion & (rng.random((size, size)) < 0.15)
                pixels[flecks] = 245
            name = f"{label}-{i}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out / "image" / name)
            split = "train" if i < 0.6 * per_class else "val" if i < 0.8 * per_class else "test"
            lines.append(json.dumps({"image": f"image/{name}", "caption": f"A {label} lesion.", "diagnosis": label,
                                     "split": split, "fitzpatrick": int(i % 6) + 1, "id": f"{label}-{i}"}))
    manifest = out / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


# Approximate skin colours of Fitzpatrick types I-VI in sRGB (a photo in daylight).
FITZPATRICK_TONES = {1: (241, 209, 188), 2: (232, 186, 158), 3: (208, 152, 118), 4: (168, 112, 80),
                     5: (118, 76, 52), 6: (72, 46, 34)}


def skin_photo(seed: int = 0, size: tuple[int, int] = (960, 720), tone: int = 3):
    """A made close-up of skin, in focus and in daylight: lit unevenly, with a fine texture, a lesion
    with an irregular border and a few hairs. The photo-quality thresholds are chosen on it and on
    its spoilt copies (blurred, dark, overexposed, shrunk)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[:height, :width] / np.array([height, width]).reshape(2, 1, 1)
    light = 1.05 - 0.35 * ((xx - 0.4) ** 2 + (yy - 0.45) ** 2)  # (H, W): brighter near one spot
    coarse = np.asarray(Image.fromarray(rng.normal(128, 40, (height // 16, width // 16)).clip(0, 255).astype(np.uint8))
                        .resize((width, height), Image.Resampling.BICUBIC), dtype=float) - 128
    base = np.array(FITZPATRICK_TONES[tone], dtype=float)
    pixels = base * light[..., None] + 0.12 * coarse[..., None] + rng.normal(0, 3.5, (height, width, 1))
    angle = np.arctan2(yy - 0.5, (xx - 0.5) * width / height)
    radius = 0.18 * (1 + 0.15 * np.sin(3 * angle + rng.uniform(0, 6)) + 0.07 * np.sin(7 * angle))
    lesion = np.hypot(yy - 0.5, (xx - 0.5) * width / height) < radius
    mottle = rng.normal(0, 8, (int(lesion.sum()), 1))
    pixels[lesion] = pixels[lesion] * np.array([0.55, 0.45, 0.42]) + mottle
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):  # hairs
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        dx, dy = rng.normal(0, width / 6, 2)
        draw.line([(x, y), (x + dx, y + dy)], fill=tuple(int(c * 0.3) for c in FITZPATRICK_TONES[tone]), width=2)
    return image
