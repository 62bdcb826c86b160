"""SkinGPT: one entry point. `python launch.py` serves the app; subcommands below.

Imports stay inside each subcommand: torch + transformers + gradio take ~12 s to import on two
cores, and `inspect` or `--help` should not pay for what they do not use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEMO_BUNDLE = ROOT / "weights" / "demo"

# Never reach a hub or send analytics at run time, whatever the environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def cmd_inspect(args: argparse.Namespace) -> int:
    from model.config import preset
    from model.summary import describe, describe_bundle, format_text

    info = describe_bundle(args.weights) if args.weights else describe(preset(args.preset))
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from model.convert import Sources, convert

    sources = Sources(llm_dir=Path(args.llm), vit=_path(args.vit), blip2=_path(args.blip2),
                      hf_blip2=_path(args.hf_blip2), finetune=_path(args.finetune))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise SystemExit(f"error: {out} exists and is not empty; choose another --out or pass --force")
    report = convert(sources, out, preset_name=args.preset, template=args.template, link=args.link)
    print("\n".join(report.notes))
    print(f"bundle written to {report.bundle}; check it with: python launch.py inspect --weights {report.bundle}")
    return 0


def cmd_fixtures(args: argparse.Namespace) -> int:
    from model.fixtures import write_demo_bundle, write_sources

    if args.bundle:
        print(f"demo bundle written to {write_demo_bundle(args.out, args.size)}")
    else:
        files = write_sources(args.out, args.size)
        print("\n".join(f"{k}: {v}" for k, v in vars(files).items()))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    print("The SkinGPT web app is not built yet (it arrives with the clinic-app issue).\n"
          "Meanwhile: `python launch.py inspect --preset skingpt4-vicuna13b` shows the model,\n"
          "`python launch.py convert --help` builds a bundle from published weights.", file=sys.stderr)
    return 0


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch.py", description="SkinGPT: a private dermatology assistant")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="serve the web app (the default)")
    serve.set_defaults(func=cmd_serve)

    ins = sub.add_parser("inspect", help="parameter counts, shapes and memory per part (on the meta device)")
    which = ins.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", help="skingpt4-vicuna7b, skingpt4-vicuna13b, skingpt4-llama2-13b, tiny, demo")
    which.add_argument("--weights", help="a bundle directory (its sha256 hashes are verified)")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.set_defaults(func=cmd_inspect)

    conv = sub.add_parser("convert", help="build a bundle from published weight files")
    conv.add_argument("--llm", required=True, help="Vicuna / Llama-2 Hugging Face directory")
    conv.add_argument("--vit", help="eva_vit_g.pth (LAVIS)")
    conv.add_argument("--blip2", help="blip2_pretrained_flant5xxl.pth (LAVIS)")
    conv.add_argument("--hf-blip2", help="a Hugging Face BLIP-2 directory (safetensors), instead of --vit/--blip2")
    conv.add_argument("--finetune", help="skinGPT_v1.pth or a MiniGPT-4 checkpoint (the projection)")
    conv.add_argument("--preset", help="architecture preset; by default chosen from the projection width")
    conv.add_argument("--template", default="skingpt4", help="prompt template the weights were trained with")
    conv.add_argument("--out", required=True, help="bundle directory to write")
    conv.add_argument("--link", action="store_true", help="hard-link LLM shards instead of copying (same disk)")
    conv.add_argument("--force", action="store_true", help="write into a non-empty --out")
    conv.set_defaults(func=cmd_convert)

    fix = sub.add_parser("fixtures", help="write tiny source files in the published formats, or the demo bundle")
    fix.add_argument("--out", required=True)
    fix.add_argument("--size", default="tiny", choices=["tiny", "demo"])
    fix.add_argument("--bundle", action="store_true", help="convert them into a bundle at --out")
    fix.set_defaults(func=cmd_fixtures)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args(["serve", *(argv or sys.argv[1:])])
    from model.errors import UserFacingError

    try:
        return args.func(args)
    except UserFacingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
