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
DEMO_BUNDLE = Path(os.environ.get("SKINGPT_DEMO_BUNDLE", ROOT / "weights" / "demo"))

# Never reach a hub or send analytics at run time, whatever the environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def cmd_inspect(args: argparse.Namespace) -> int:
    from model.nn.config import preset
    from model.weights.summary import describe, describe_bundle, format_text

    info = describe_bundle(args.weights, None if args.verify else _record(args.weights)) if args.weights \
        else describe(preset(args.preset))
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from model.weights.convert import Sources, convert

    sources = Sources(llm_dir=Path(args.llm), vit=_path(args.vit), blip2=_path(args.blip2),
                      hf_blip2=_path(args.hf_blip2), finetune=_path(args.finetune))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise SystemExit(f"error: {out} exists and is not empty; choose another --out or pass --force")
    report = convert(sources, out, preset_name=args.preset, template=args.template, link=args.link)
    print("\n".join(report.notes))
    print(f"bundle written to {report.bundle}; check it with: python launch.py inspect --weights {report.bundle}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from model.weights.bundle import quantize_bundle

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} exists and is not empty; choose another --out")
    quantize_bundle(args.weights, out, args.mode)
    print(f"{args.mode} bundle written to {out}; serve it with: python launch.py --weights {out}")
    return 0


def cmd_fixtures(args: argparse.Namespace) -> int:
    from tools.fixtures import write_demo_bundle, write_sources

    if args.bundle:
        print(f"demo bundle written to {write_demo_bundle(args.out, args.size)}")
    else:
        files = write_sources(args.out, args.size)
        print("\n".join(f"{k}: {v}" for k, v in vars(files).items()))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from app.settings import AppSettings, SettingsError

    flags = {k: getattr(args, k) for k in ("weights", "quantize", "device", "dtype", "host", "port", "auth", "api_key")}
    if args.no_api:
        flags["no_api"] = True
    try:
        settings = AppSettings(**{k: v for k, v in flags.items() if v is not None})
        settings.check_safe()
    except (ValidationError, SettingsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.weights = settings.weights
    bundle = _bundle_path(args)
    from app.server import serve

    serve(settings, bundle, demo_mode=settings.weights is None, say=lambda line: print(line, flush=True))
    return 0


def _bundle_path(args: argparse.Namespace) -> Path:
    """--weights, or the demo bundle (generated on first use), saying so on stderr."""
    if args.weights:
        return Path(args.weights)
    if not (DEMO_BUNDLE / "manifest.json").is_file():
        from tools.fixtures import write_demo_bundle

        print(f"No --weights given and no demo bundle yet: generating one at {DEMO_BUNDLE} ...", file=sys.stderr)
        write_demo_bundle(DEMO_BUNDLE)
    print("Using the DEMO bundle: random weights, so the answers mean nothing. Pass --weights DIR for a real "
          "model (see weights/README.md).", file=sys.stderr)
    return DEMO_BUNDLE


def _policy(args: argparse.Namespace):
    from model.weights.policy import LoadPolicy

    return LoadPolicy(device=args.device, dtype=args.dtype, quantize=args.quantize)


def _record(bundle: str | Path) -> Path:
    """Where this user's record of which bundle files already passed their sha256 check lives."""
    from app.settings import default_cache_dir
    from model.weights.bundle import verification_record

    return verification_record(default_cache_dir(), bundle)


def _engine(args: argparse.Namespace):
    from model.weights.bundle import load_bundle
    from model.serving.engine import Engine

    from model.weights.policy import cpu_advice

    bundle, policy = _bundle_path(args), _policy(args)
    if (advice := cpu_advice(policy)) and bundle != DEMO_BUNDLE:
        print(f"warning: {advice}", file=sys.stderr)
    loaded = load_bundle(bundle, policy, record=_record(bundle))
    if loaded.note and bundle != DEMO_BUNDLE:
        print(loaded.note, file=sys.stderr)
    return Engine(loaded)


def _settings(args: argparse.Namespace) -> dict:
    chosen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    settings = {k: v for k, v in chosen.items() if v is not None}
    if args.greedy:
        settings["do_sample"] = False
    return settings


def _language(args: argparse.Namespace) -> str:
    """--lang, or the terminal's locale (LC_ALL, LC_MESSAGES, LANG)."""
    from model.i18n.catalog import pick

    return args.lang or pick(os.environ.get("LC_ALL"), os.environ.get("LC_MESSAGES"), os.environ.get("LANG"))


def cmd_ask(args: argparse.Namespace) -> int:
    from model.clinical.consultation import ask_in
    from model.clinical.conversation import Conversation, ImageInput
    from model.i18n.catalog import text
    from model.images.decode import read_photo_file

    lang = _language(args)
    if args.pdf and not args.report:
        raise SystemExit("error: --pdf writes the report: add --report")
    photo = read_photo_file(args.image)
    for note in photo.notes:
        print(f"note: {note}", file=sys.stderr)
    image = ImageInput.of(photo.image)
    engine = _engine(args)
    if args.report:
        from model.clinical.consultation import consult

        report = consult(lambda conv: engine.answer(conv, session="ask", seed=args.seed, **_settings(args)), image,
                         lang=lang)
        if (ranking := engine.rank([image])) is not None:
            report.differential, report.differential_uncertain = ranking.conditions, ranking.uncertain
        print(report.model_dump_json(indent=2) if args.json else report.markdown())
        if args.pdf:
            from model.clinical.report_pdf import report_pdf

            Path(args.pdf).write_bytes(report_pdf(report))
            print(f"PDF report written to {args.pdf}", file=sys.stderr)
        return 0
    question = args.question or text(lang, "flow.describe")
    conversation = Conversation().ask(ask_in(lang, question), [image])
    generation = engine.stream(conversation, seed=args.seed, **_settings(args))
    if args.json:
        answer = "".join(generation)
        result = {"question": question, "answer": answer.strip(), "finish_reason": generation.finish_reason,
                  "notices": generation.notices, "disclaimer": text(lang, "disclaimer"), "language": lang}
        if (ranking := engine.rank([image])) is not None:
            result.update(differential=ranking.conditions, differential_uncertain=ranking.uncertain)
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        for piece in generation:
            print(piece, end="", flush=True)
        print()
        for notice in generation.notices:
            print(f"note: {notice}", file=sys.stderr)
        if (ranking := engine.rank([image])) is not None:
            print(f"\n{text(lang, 'report.ranked')} (calibrated):")
            print("\n".join(f"  {c['condition']:<28} {100 * c['probability']:5.1f}%" for c in ranking.conditions))
            if ranking.uncertain:
                print(f"  {text(lang, 'report.uncertain')}")
    return 0


def cmd_train_differential(args: argparse.Namespace) -> int:
    from model.training.fit_differential import build

    out, head = build(args.data, args.weights, args.out, labels=args.labels, feature=args.features,
                      val_fraction=args.val_fraction, target_precision=args.target_precision, seed=args.seed,
                      say=lambda line: print(line, flush=True))
    metrics = head.metrics
    held_out = metrics.get("test") or metrics["validation"]
    which = "test" if "test" in metrics else "validation"
    print(f"features: {head.feature} (held-out top-1 by kind: {metrics['feature_choice']})")
    print(f"held-out ({which}) top-1 {100 * held_out['top1']:.1f}% (chance {100 * held_out['chance']:.1f}%), "
          f"top-3 {100 * held_out['top3']:.1f}%, balanced accuracy {100 * held_out['balanced_accuracy']:.1f}%; "
          f"ECE {held_out['ece_before']:.3f} -> {held_out['ece_after']:.3f} after temperature scaling "
          f"(T={head.temperature:.2f}); 'uncertain' below {100 * head.threshold:.0f}% "
          f"(for {100 * metrics['target_precision']:.0f}% precision on validation)")
    print(f"bundle with the head written to {out} (reliability plot: {out / 'differential-reliability.png'}); "
          f"serve it with: python launch.py --weights {out}")
    return 0


CHAT_HELP = "Commands: /image PATH adds a photo, /new starts a new consultation, /quit leaves."


def cmd_chat(args: argparse.Namespace) -> int:
    import threading

    from model.clinical.conversation import Conversation, ImageInput
    from model.errors import UserFacingError
    from model.images.decode import read_image_file
    from model.clinical.consultation import ask_in
    from model.i18n.catalog import text
    from model.clinical.safety import red_flags

    lang = _language(args)
    engine = _engine(args)
    print(f"{text(lang, 'disclaimer')}\n{CHAT_HELP}", file=sys.stderr)
    conversation, pending = Conversation(), [ImageInput.of(read_image_file(args.image))] if args.image else []
    session = "chat"
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line == "/quit":
            return 0
        if line == "/new":
            engine.forget(session)
            conversation, pending = Conversation(), []
            print("New consultation: everything before is forgotten.", file=sys.stderr)
            continue
        if line.startswith("/image "):
            try:
                pending.append(ImageInput.of(read_image_file(line.split(" ", 1)[1].strip())))
                print("Photo added; it goes with your next question.", file=sys.stderr)
            except UserFacingError as err:
                print(f"error: {err}", file=sys.stderr)
            continue
        if not conversation.images and not pending:
            print("Please add a photo first: /image PATH", file=sys.stderr)
            continue
        conversation = conversation.ask(ask_in(lang, line), pending)
        pending = []
        cancel = threading.Event()
        generation = engine.stream(conversation, session=session, cancel=cancel, seed=args.seed, **_settings(args))
        print("skingpt> ", end="", flush=True)
        try:
            for piece in generation:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            cancel.set()  # Ctrl-C stops this answer, not the chat
        print()
        for notice in generation.notices:
            print(f"note: {notice}", file=sys.stderr)
        flags = red_flags(line, generation.text, lang=lang)
        if flags:
            print(f"note: {text(lang, 'messages.warning_signs')} ({', '.join(flags)}). {text(lang, 'urgent_advice')}",
                  file=sys.stderr)
        conversation = conversation.answer(generation.text.strip())


def cmd_bench(args: argparse.Namespace) -> int:
    from tools.bench import format_concurrency, format_table, load_for_bench, run, run_concurrency

    if not args.random_init and not args.weights:
        raise SystemExit("error: pass --preset NAME --random-init, or --weights DIR")
    try:
        levels = [int(n) for n in args.concurrency.split(",")] if args.concurrency else []
    except ValueError:
        raise SystemExit(f"error: --concurrency takes session counts like 1,2,4,8, not {args.concurrency!r}") from None
    if any(n < 1 for n in levels):
        raise SystemExit("error: --concurrency counts must be at least 1")
    if args.save and not args.random_init:
        raise SystemExit("error: --save writes a --random-init model; to quantise a bundle use `launch.py quantize`")
    loaded, load_s = load_for_bench(args.preset if args.random_init else None, args.weights, _policy(args),
                                    Path(args.save) if args.save else None)
    if loaded.note:
        print(loaded.note, file=sys.stderr)
    result = run(loaded, load_s, turns=args.turns, new_tokens=args.new_tokens)
    from app.api.chat import followup_ttft
    from model.serving.engine import Engine

    result["api_followups"] = followup_ttft(Engine(loaded), args.turns, args.new_tokens)
    if levels:
        result["concurrency"] = run_concurrency(loaded, levels, new_tokens=args.new_tokens)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
        print("\nthrough the API (the whole history each time): turn, prompt, cached, TTFT ms")
        print("\n".join(f"{r['turn']:>4}  {r['prompt_tokens']:>6}  {r['cached_tokens']:>6}  {r['ttft_ms']:>7.1f}"
                        for r in result["api_followups"]))
        if levels:
            print("\n" + format_concurrency(result["concurrency"]))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from model.training.config import StepConfig
    from model.training.loop import train

    cfg = StepConfig.from_yaml(args.config)
    if args.max_steps is not None:
        cfg = dataclasses.replace(cfg, max_steps=args.max_steps)
    weights = args.weights or cfg.weights
    if not weights or not Path(weights).is_dir():
        raise SystemExit(f"error: no starting bundle at {weights!r}: pass --weights DIR or set `weights:` in "
                         f"{args.config} (step 2 starts from step 1's RUN_DIR/bundle; for a quick try: "
                         f"--weights weights/demo)")
    train(cfg, args.data, args.out, weights, resume=args.resume, say=lambda line: print(line, flush=True))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from model.evaluation.labels import LabelSet

    labels = LabelSet.from_yaml(args.labels) if getattr(args, "labels", None) else None
    if args.eval_command == "predict":
        from model.evaluation.predict import predict

        path = predict(_engine(args), args.manifest, args.out, labels=labels, seed=args.seed,
                       report=not args.no_report, settings=_settings(args))
        print(f"predictions in {path}; score them with: python launch.py eval score {args.out} --labels LABELS.yaml")
    elif args.eval_command == "score":
        from model.evaluation.report import score

        result = score(args.run, labels, n_boot=args.bootstrap, seed=args.seed)
        print(json.dumps(result, indent=2) if args.json else (Path(args.run) / "report.md").read_text())
        print(f"written: {args.run}/score.json, report.md, confusion.png, per_class.png, skin_tone.png"
              + (", differential-reliability.png" if "differential" in result else ""), file=sys.stderr)
    elif args.eval_command == "review-packet":
        from model.evaluation.review import review_packet

        out = review_packet(args.run, args.out or Path(args.run) / "review", reviewers=args.reviewers, lang=args.lang)
        print(f"packet: {out / 'packet.html'}; sheets: {out / 'sheets'}/reviewer-N.csv")
    elif args.eval_command == "review-score":
        from model.evaluation.review import review_markdown, review_score

        result = review_score(args.sheets, n_boot=args.bootstrap, seed=args.seed)
        print(json.dumps(result, indent=2) if args.json else review_markdown(result))
    elif args.eval_command == "consistency":
        from model.evaluation.predict import consistency, read_cases
        from model.clinical.conversation import Conversation
        from model.clinical.consultation import DEFAULT_FLOW

        engine = _engine(args)
        settings = {"do_sample": True, **_settings(args)}

        def ask(image, seed):
            return engine.answer(Conversation().ask(DEFAULT_FLOW[0].question, [image]), seed=seed, **settings)

        result = consistency(ask, read_cases(args.manifest, labels), labels, runs=args.runs, seed=args.seed)
        summary = {k: v for k, v in result.items() if k != "per_case"}
        print(json.dumps(result if args.json else summary, indent=2))
    return 0


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


QUANTIZE_HELP = ("auto (the default: on a CPU, for an LLM over 2 GiB, the fastest mode that fits in memory) | none | "
                 "int8 | nf4 (bitsandbytes, GPUs) | int8w | int4 (PyTorch's CPU kernels); the LLM only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch.py", description="SkinGPT: a private dermatology assistant")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="serve the web app (the default); flags also as SKINGPT_* variables")
    serve.add_argument("--weights", help="bundle directory (default: the demo bundle, random weights)")
    serve.add_argument("--quantize", help=QUANTIZE_HELP)
    serve.add_argument("--device", help="auto | cpu | cuda")
    serve.add_argument("--dtype", help="auto | fp32 | fp16 | bf16")
    serve.add_argument("--host", help="default 127.0.0.1; any other address needs --auth")
    serve.add_argument("--port", type=int, help="default 7860")
    serve.add_argument("--auth", help="user:password, required off loopback")
    serve.add_argument("--api-key", help="bearer key of the OpenAI-compatible API (better: SKINGPT_API_KEY, which "
                                         "other users cannot read in the process list); required off loopback")
    serve.add_argument("--no-api", action="store_true", help="no /v1 API, the web page only")
    serve.set_defaults(func=cmd_serve)

    ins = sub.add_parser("inspect", help="parameter counts, shapes and memory per part (on the meta device)")
    which = ins.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", help="skingpt4-vicuna7b, skingpt4-vicuna13b, skingpt4-llama2-13b, small, tiny, demo")
    which.add_argument("--weights", help="a bundle directory (its sha256 hashes are verified)")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.add_argument("--verify", action="store_true",
                     help="hash every file of --weights again (otherwise files unchanged since they last passed are "
                          "not re-read)")
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

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--weights", help="bundle directory (default: the demo bundle, random weights)")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda")
        p.add_argument("--dtype", default="auto", help="auto | fp32 | fp16 | bf16")
        p.add_argument("--quantize", default="auto", help=QUANTIZE_HELP)

    def gen_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-new-tokens", type=int)
        p.add_argument("--temperature", type=float)
        p.add_argument("--top-p", type=float)
        p.add_argument("--greedy", action="store_true", help="greedy decoding")
        p.add_argument("--seed", type=int, default=None)

    ask = sub.add_parser("ask", help="one question about one photo")
    ask.add_argument("--image", required=True)
    ask.add_argument("--question", help="default: asks for a description, in the chosen language")
    ask.add_argument("--json", action="store_true")
    ask.add_argument("--report", action="store_true", help="run the structured consultation and print its report")
    ask.add_argument("--pdf", help="with --report: also write the report as a PDF here")
    ask.add_argument("--lang", choices=("en", "zh"), help="language of the questions, answers and report "
                                                          "(default: the terminal's locale)")
    model_args(ask)
    gen_args(ask)
    ask.set_defaults(func=cmd_ask)

    td = sub.add_parser("train-differential", help="a calibrated ranked differential head on a bundle's image features")
    td.add_argument("--data", required=True, help="training manifest (JSONL) whose records have a diagnosis; "
                                                 "\"split\": train | val | test (else a held-out fraction)")
    td.add_argument("--weights", required=True, help="the bundle whose encoder gives the features")
    td.add_argument("--out", required=True, help="the new bundle (the encoder and LLM, plus the head)")
    td.add_argument("--labels", help="labels.yaml: conditions and their synonyms (as for eval)")
    td.add_argument("--features", default="auto", choices=("auto", "vit", "qformer", "both"),
                    help="auto: the kind with the best held-out accuracy")
    td.add_argument("--val-fraction", type=float, default=0.2)
    td.add_argument("--target-precision", type=float, default=0.9,
                    help="'uncertain' below the top probability that reaches this precision on validation")
    td.add_argument("--seed", type=int, default=0)
    td.set_defaults(func=cmd_train_differential)

    chat = sub.add_parser("chat", help="a terminal chat that streams")
    chat.add_argument("--image", help="the first photo (or add one with /image PATH)")
    chat.add_argument("--lang", choices=("en", "zh"), help="answer language (default: the terminal's locale)")
    model_args(chat)
    gen_args(chat)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="load time, encode, TTFT, decode speed, follow-ups vs the reference style")
    bench.add_argument("--preset", default="tiny")
    bench.add_argument("--random-init", action="store_true", help="random weights, no files (int8w / int4 are built one "
                       "layer at a time: a 7B int4 fits in 8 GB)")
    bench.add_argument("--turns", type=int, default=8)
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--concurrency", help="also serve N sessions at once (e.g. 1,2,4,8), against the same N "
                                              "one after another")
    bench.add_argument("--save", help="with --random-init: also write the model as a bundle here (weight-only modes "
                                      "layer by layer), to time loading it with --weights")
    bench.add_argument("--json", action="store_true")
    model_args(bench)
    bench.set_defaults(func=cmd_bench)

    tr = sub.add_parser("train", help="one training step (step1 / step2 config); torchrun runs it on many GPUs")
    tr.add_argument("--config", required=True, help="a step YAML file (see configs/)")
    tr.add_argument("--data", required=True, help="a JSONL manifest, DIR/manifest.jsonl, or DIR/filter_cap.json + DIR/image/")
    tr.add_argument("--out", required=True, help="run directory: metrics, checkpoints, the final bundle")
    tr.add_argument("--weights", help="bundle to start from (overrides the config's weights:)")
    tr.add_argument("--resume", action="store_true", help="continue from RUN_DIR's latest checkpoint")
    tr.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluation: predict, score, review-packet, review-score, consistency")
    evsub = ev.add_subparsers(dest="eval_command", required=True)
    pr = evsub.add_parser("predict", help="run the engine over a case manifest (resumable)")
    pr.add_argument("--manifest", required=True, help="cases.jsonl: image, optional diagnosis, fitzpatrick, id")
    pr.add_argument("--out", required=True, help="run directory (predictions.jsonl, run.json)")
    pr.add_argument("--labels", help="labels.yaml: check every case's label against it")
    pr.add_argument("--no-report", action="store_true", help="one question per case instead of the consultation")
    model_args(pr)
    gen_args(pr)
    pr.set_defaults(seed=0)
    sc = evsub.add_parser("score", help="accuracy, balanced accuracy, per class and by skin tone, with 95% CIs")
    sc.add_argument("run")
    sc.add_argument("--labels", required=True)
    sc.add_argument("--bootstrap", type=int, default=1000)
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--json", action="store_true")
    rp = evsub.add_parser("review-packet", help="an HTML packet and a CSV sheet per reviewer")
    rp.add_argument("run")
    rp.add_argument("--out", help="default: RUN/review")
    rp.add_argument("--reviewers", type=int, default=5)
    rp.add_argument("--lang", choices=("en", "zh"), default="en", help="language of the packet")
    rs = evsub.add_parser("review-score", help="filled sheets -> the paper's table, with Fleiss' kappa")
    rs.add_argument("sheets", nargs="+")
    rs.add_argument("--bootstrap", type=int, default=1000)
    rs.add_argument("--seed", type=int, default=0)
    rs.add_argument("--json", action="store_true")
    co = evsub.add_parser("consistency", help="ask each case N times; how often the diagnosis agrees")
    co.add_argument("--manifest", required=True)
    co.add_argument("--labels", required=True)
    co.add_argument("--runs", type=int, default=10)
    co.add_argument("--json", action="store_true")
    model_args(co)
    gen_args(co)
    co.set_defaults(seed=0)
    ev.set_defaults(func=cmd_eval)

    qu = sub.add_parser("quantize", help="write a copy of a bundle with its LLM in int8w or int4, for CPU workstations")
    qu.add_argument("--weights", required=True, help="the float bundle")
    qu.add_argument("--mode", required=True, choices=("int8w", "int4"),
                    help="int8w: 1 byte a weight, closest to the float model; int4: half a byte")
    qu.add_argument("--out", required=True, help="the new bundle directory")
    qu.set_defaults(func=cmd_quantize)

    fix = sub.add_parser("fixtures", help="write tiny source files in the published formats, or the demo bundle")
    fix.add_argument("--out", required=True)
    fix.add_argument("--size", default="tiny", choices=["tiny", "demo"])
    fix.add_argument("--bundle", action="store_true", help="convert them into a bundle at --out")
    fix.set_defaults(func=cmd_fixtures)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if not argv or (argv[0] not in commands and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]  # `python launch.py [--port N ...]` serves the app
    args = parser.parse_args(argv)
    from model.errors import UserFacingError

    try:
        return args.func(args)
    except UserFacingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
