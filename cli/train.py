"""Training: `train` (one step of the two-step fine-tuning) and `train-differential` (the ranked head)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.common import ArgumentProblem
from model.errors import spell


def register(sub) -> None:
    tr = sub.add_parser("train", help="one training step (step1 / step2 config); torchrun runs it on many GPUs")
    tr.add_argument("--config", required=True, help="a step YAML file (see configs/)")
    tr.add_argument("--data", required=True, help="a JSONL manifest, DIR/manifest.jsonl, or DIR/filter_cap.json + DIR/image/")
    tr.add_argument("--out", required=True, help="run directory: metrics, checkpoints, the final bundle")
    tr.add_argument("--weights", help="bundle to start from (overrides the config's weights:)")
    tr.add_argument("--resume", action="store_true", help="continue from RUN_DIR's latest checkpoint")
    tr.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    tr.set_defaults(func=run_train)

    td = sub.add_parser("train-differential", help="a calibrated ranked differential head on a bundle's image features")
    td.add_argument("--data", required=True, help="training manifest (JSONL) whose records have a diagnosis; "
                                                 "\"split\": train | val | test (else a held-out fraction)")
    td.add_argument("--weights", required=True, help="the bundle whose encoder gives the features")
    td.add_argument("--out", required=True, help="the new bundle (the encoder and LLM, plus the head)")
    td.add_argument("--labels", help="labels.yaml: conditions and their synonyms (as for eval)")
    td.add_argument("--features", default="auto", choices=("auto", "vit", "qformer", "both"),
                    help="auto: the kind with the best held-out accuracy")
    td.add_argument("--val-fraction", type=float, default=0.2, help="held out for validation when no split is given")
    td.add_argument("--target-precision", type=float, default=0.9,
                    help="'uncertain' below the top probability that reaches this precision on validation")
    td.add_argument("--seed", type=int, default=0, help="seed of the split and the head's initialisation")
    td.set_defaults(func=run_train_differential)


def run_train(args: argparse.Namespace) -> int:
    import dataclasses

    from model.training.config import StepConfig
    from model.training.loop import train

    cfg = StepConfig.from_yaml(args.config)
    if args.max_steps is not None:
        cfg = dataclasses.replace(cfg, max_steps=args.max_steps)
    weights = args.weights or cfg.weights
    if not weights or not Path(weights).is_dir():
        raise ArgumentProblem(f"no starting bundle at {weights!r}: pass --weights DIR or set `weights:` in "
                         f"{args.config} (step 2 starts from step 1's RUN_DIR/bundle; for a quick try: "
                         f"--weights weights/demo)")
    train(cfg, args.data, args.out, weights, resume=args.resume, say=lambda line: print(spell(line, cli=True), flush=True))
    return 0


def run_train_differential(args: argparse.Namespace) -> int:
    from model.training.fit_differential import build

    out, head = build(args.data, args.weights, args.out, labels=args.labels, feature=args.features,
                      val_fraction=args.val_fraction, target_precision=args.target_precision, seed=args.seed,
                      say=lambda line: print(spell(line, cli=True), flush=True))
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
