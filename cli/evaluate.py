"""`eval`: predict, score, review-packet, review-score, consistency."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.common import engine, model_args, sampling, sampling_args
from model.i18n.catalog import LANGUAGES


def register(sub) -> None:
    ev = sub.add_parser("eval", help="evaluation: predict, score, review-packet, review-score, consistency")
    evsub = ev.add_subparsers(dest="eval_command", required=True)
    pr = evsub.add_parser("predict", help="run the engine over a case manifest (resumable)")
    pr.add_argument("--manifest", required=True, help="cases.jsonl: image, optional diagnosis, fitzpatrick, id")
    pr.add_argument("--out", required=True, help="run directory (predictions.jsonl, run.json)")
    pr.add_argument("--labels", help="labels.yaml: check every case's label against it")
    pr.add_argument("--no-report", action="store_true", help="one question per case instead of the consultation")
    pr.add_argument("--context", choices=("on", "off"), default="on",
                    help="on: each case's clinical history (its \"history\") goes with the first question; off: "
                         "withheld. Run both into one --out and `score` sets them side by side")
    model_args(pr)
    sampling_args(pr)
    pr.set_defaults(seed=0, func=predict)
    sc = evsub.add_parser("score", help="accuracy, balanced accuracy, per class and by skin tone, with 95% CIs")
    sc.add_argument("run", help="the run directory of `eval predict`")
    sc.add_argument("--labels", required=True, help="labels.yaml: conditions and their synonyms")
    sc.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--json", action="store_true")
    sc.set_defaults(func=score)
    rp = evsub.add_parser("review-packet", help="an HTML packet and a CSV sheet per reviewer")
    rp.add_argument("run", help="the run directory of `eval predict`")
    rp.add_argument("--out", help="default: RUN/review")
    rp.add_argument("--reviewers", type=int, default=5)
    rp.add_argument("--lang", choices=LANGUAGES, default="en", help="language of the packet")
    rp.set_defaults(func=review_packet)
    rs = evsub.add_parser("review-score", help="filled sheets -> the paper's table, with Fleiss' kappa")
    rs.add_argument("sheets", nargs="+", help="the reviewers' filled CSV sheets")
    rs.add_argument("--bootstrap", type=int, default=1000)
    rs.add_argument("--seed", type=int, default=0)
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(func=review_score)
    co = evsub.add_parser("consistency", help="ask each case N times; how often the diagnosis agrees")
    co.add_argument("--manifest", required=True)
    co.add_argument("--labels", required=True)
    co.add_argument("--runs", type=int, default=10)
    co.add_argument("--json", action="store_true")
    model_args(co)
    sampling_args(co)
    co.set_defaults(seed=0, func=consistency)


def _labels(args: argparse.Namespace):
    from model.evaluation.labels import LabelSet

    return LabelSet.from_yaml(args.labels) if getattr(args, "labels", None) else None


def predict(args: argparse.Namespace) -> int:
    from model.evaluation.predict import predict as run

    path = run(engine(args), args.manifest, args.out, labels=_labels(args), seed=args.seed,
               report=not args.no_report, settings=sampling(args, seeded=False).overrides(), context=args.context)
    print(f"predictions in {path}; score them with: python launch.py eval score {args.out} --labels LABELS.yaml")
    return 0


def score(args: argparse.Namespace) -> int:
    import sys

    from model.evaluation.report import score as run

    result = run(args.run, _labels(args), n_boot=args.bootstrap, seed=args.seed)
    print(json.dumps(result, indent=2) if args.json else (Path(args.run) / "report.md").read_text())
    print(f"written: {args.run}/score.json, report.md, confusion.png, per_class.png, skin_tone.png"
          + (", differential-reliability.png" if "differential" in result else ""), file=sys.stderr)
    return 0


def review_packet(args: argparse.Namespace) -> int:
    from model.evaluation.review import review_packet as run

    out = run(args.run, args.out or Path(args.run) / "review", reviewers=args.reviewers, lang=args.lang)
    print(f"packet: {out / 'packet.html'}; sheets: {out / 'sheets'}/reviewer-N.csv")
    return 0


def review_score(args: argparse.Namespace) -> int:
    from model.evaluation.review import review_markdown, review_score as run

    result = run(args.sheets, n_boot=args.bootstrap, seed=args.seed)
    print(json.dumps(result, indent=2) if args.json else review_markdown(result))
    return 0


def consistency(args: argparse.Namespace) -> int:
    from model.clinical.consultation import DEFAULT_FLOW
    from model.prompt.conversation import Conversation
    from model.evaluation.predict import consistency as run, read_cases

    labels = _labels(args)
    model = engine(args)
    settings = {"do_sample": True, **sampling(args, seeded=False).overrides()}  # each run is seeded below

    def ask(image, seed):
        return model.answer(Conversation().ask(DEFAULT_FLOW[0].question, [image]), seed=seed, **settings)

    result = run(ask, read_cases(args.manifest, labels), labels, runs=args.runs, seed=args.seed)
    summary = {k: v for k, v in result.items() if k != "per_case"}
    print(json.dumps(result if args.json else summary, indent=2))
    return 0
