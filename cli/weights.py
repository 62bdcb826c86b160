"""Commands on weight files: `inspect`, `convert`, `quantize`, `export-vllm`, `fixtures`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.common import ArgumentProblem, empty_out, record
from model.choices import BUNDLE_QUANTIZE, ENCODER_STORAGE, PRESETS


def register(sub) -> None:
    ins = sub.add_parser("inspect", help="parameter counts, shapes and memory per part (on the meta device)")
    which = ins.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=PRESETS, help="the architecture")
    which.add_argument("--weights", help="a bundle directory (its sha256 hashes are verified)")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.add_argument("--verify", action="store_true",
                     help="hash every file of --weights again (otherwise files unchanged since they last passed are "
                          "not re-read)")
    ins.set_defaults(func=inspect)

    conv = sub.add_parser("convert", help="build a bundle from published weight files")
    conv.add_argument("--llm", required=True, help="Vicuna / Llama-2 Hugging Face directory")
    conv.add_argument("--vit", help="eva_vit_g.pth (LAVIS)")
    conv.add_argument("--blip2", help="blip2_pretrained_flant5xxl.pth (LAVIS)")
    conv.add_argument("--hf-blip2", help="a Hugging Face BLIP-2 directory (safetensors), instead of --vit/--blip2")
    conv.add_argument("--finetune", help="skinGPT_v1.pth or a MiniGPT-4 checkpoint (the projection)")
    conv.add_argument("--preset", choices=PRESETS, help="architecture preset; by default chosen from the "
                                                             "projection width")
    conv.add_argument("--template", default="skingpt4", help="prompt template the weights were trained with")
    conv.add_argument("--out", required=True, help="bundle directory to write")
    conv.add_argument("--link", action="store_true", help="hard-link LLM shards instead of copying (same disk)")
    conv.add_argument("--force", action="store_true", help="write into a non-empty --out")
    conv.set_defaults(func=convert)

    qu = sub.add_parser("quantize", help="write a copy of a bundle with its LLM (or encoder) quantised, for CPU "
                                         "workstations")
    qu.add_argument("--weights", required=True, help="the float bundle (or, for --encoder alone, a quantised one)")
    qu.add_argument("--mode", choices=BUNDLE_QUANTIZE,
                    help="q4_k_m | q4_0 | q8_0 | f16 | f32: the LLM as one GGUF file that llama.cpp runs (the "
                         "fastest on a CPU; q4_k_m and q4_0 take half a byte a weight, q8_0 one); int8w | int4: "
                         "PyTorch's weight-only kernels; leave it out to keep a quantised bundle's LLM")
    qu.add_argument("--encoder", default="bf16", choices=ENCODER_STORAGE,
                    help="bf16 (default) | int8: the image encoder's ViT linears in int8, 1 GB less for a ViT-g; "
                         "opt-in, as its effect on a trained encoder is unmeasured: compare with `eval` first")
    qu.add_argument("--out", required=True, help="the new bundle directory")
    qu.set_defaults(func=quantize)

    ex = sub.add_parser("export-vllm", help="write a directory `vllm serve` loads with the SkinGPT plugin "
                                            "(requirements-vllm-cpu.txt / requirements-vllm.txt)")
    ex.add_argument("--weights", required=True, help="a float bundle (fp32, bf16 or fp16 safetensors)")
    ex.add_argument("--out", required=True, help="the new directory")
    ex.set_defaults(func=export_vllm)

    fix = sub.add_parser("fixtures", help="write tiny source files in the published formats, or the demo bundle")
    fix.add_argument("--out", required=True)
    fix.add_argument("--size", default="tiny", choices=["tiny", "demo"])
    fix.add_argument("--bundle", action="store_true", help="convert them into a bundle at --out")
    fix.set_defaults(func=fixtures)


def inspect(args: argparse.Namespace) -> int:
    from model.nn.config import preset
    from model.weights.summary import describe, describe_bundle, format_text

    info = describe_bundle(args.weights, None if args.verify else record(args.weights)) if args.weights \
        else describe(preset(args.preset))
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


def convert(args: argparse.Namespace) -> int:
    from model.weights.convert import Sources, convert as write_bundle

    sources = Sources(llm_dir=Path(args.llm), vit=_path(args.vit), blip2=_path(args.blip2),
                      hf_blip2=_path(args.hf_blip2), finetune=_path(args.finetune))
    out = Path(args.out)
    empty_out(out, args.force, "choose another --out or pass --force")
    report = write_bundle(sources, out, preset_name=args.preset, template=args.template, link=args.link)
    print("\n".join(report.notes))
    print(f"bundle written to {report.bundle}; check it with: python launch.py inspect --weights {report.bundle}")
    return 0


def quantize(args: argparse.Namespace) -> int:
    from model.weights.bundle import quantize_bundle

    if args.mode is None and args.encoder == "bf16":
        raise ArgumentProblem("quantize: say what to quantise: --mode for the LLM, --encoder int8 for the image "
                              "encoder")
    out = Path(args.out)
    empty_out(out)
    quantize_bundle(args.weights, out, args.mode, args.encoder)
    what = ", ".join(w for w in (f"LLM {args.mode}" if args.mode else "", f"encoder {args.encoder}") if w)
    print(f"bundle ({what}) written to {out}; serve it with: python launch.py --weights {out}")
    return 0


def export_vllm(args: argparse.Namespace) -> int:
    from app.settings import MAX_PHOTOS
    from model.weights.vllm_export import export_vllm as export

    out = Path(args.out)
    empty_out(out)
    export(args.weights, out, max_images=MAX_PHOTOS, record=record(args.weights))
    print(f"vLLM model directory written to {out}; in vLLM's environment serve it with:\n"
          f"  vllm serve {out} --served-model-name skingpt\n"
          f"and answer the app through it: python launch.py serve --weights {args.weights} "
          f"--engine-url http://127.0.0.1:8000/v1")
    return 0


def fixtures(args: argparse.Namespace) -> int:
    from tools.fixtures import write_demo_bundle, write_sources

    if args.bundle:
        print(f"demo bundle written to {write_demo_bundle(args.out, args.size)}")
    else:
        files = write_sources(args.out, args.size)
        print("\n".join(f"{k}: {v}" for k, v in vars(files).items()))
    return 0


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None
