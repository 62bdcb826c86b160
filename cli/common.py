"""What several commands share: the bundle they load, the load policy, sampling flags, the language."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from model.errors import UserFacingError, spell
from model.choices import (DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_QUANTIZE, DTYPES, QUANTIZE, QUANTIZE_HELP, ChoiceError,
                           check_device)

ROOT = Path(__file__).resolve().parent.parent
LANGUAGE_HELP = "language of the questions, answers and report (default: the terminal's locale)"



def device_name(value: str) -> str:
    """--device, checked while the arguments are read (model.choices.check_device)."""
    try:
        return check_device(value)
    except ChoiceError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def model_args(p: argparse.ArgumentParser, more_modes: tuple[str, ...] = (), more_help: str = "") -> None:
    """Flags of every command that loads a bundle (`more_modes`: --quantize choices of that command alone)."""
    p.add_argument("--weights", help="bundle directory (default: the demo bundle, random weights)")
    p.add_argument("--device", default=DEFAULT_DEVICE, type=device_name, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPES, help="precision of the weights (default: auto)")
    p.add_argument("--quantize", default=DEFAULT_QUANTIZE, choices=QUANTIZE + more_modes, help=QUANTIZE_HELP + more_help)


def sampling_args(p: argparse.ArgumentParser) -> None:
    """Flags of every command that generates text (the fields of `SamplingSettings`)."""
    p.add_argument("--max-new-tokens", type=int, help="longest answer, in tokens (default: the bundle's)")
    p.add_argument("--temperature", type=float, help="sampling temperature; 0 means greedy")
    p.add_argument("--top-p", type=float, help="nucleus sampling: keep the most likely tokens up to this mass")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (the same answer every time)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (a seeded answer repeats)")


def check_sampling(args: argparse.Namespace) -> None:
    """The sampling flags against the bundle's own limits, read from its skingpt.yaml before the model
    loads (the demo's preset when the demo bundle is not written yet), in the flags' own names."""
    from model.nn.config import ConfigError, SkinGPTConfig, preset

    bundle = Path(args.weights) if args.weights else settings().demo_path()
    try:
        config = SkinGPTConfig.from_yaml(bundle / "skingpt.yaml") if (bundle / "skingpt.yaml").is_file() else preset("demo")
    except ConfigError:
        return  # the bundle's own loader says what is wrong with its file, in full
    context = config.context
    if args.max_new_tokens is not None and not 1 <= args.max_new_tokens < context:
        raise ArgumentProblem(f"--max-new-tokens must be between 1 and {context - 1}: this model's context holds "
                              f"{context} positions, the photo and question included (got {args.max_new_tokens})")
    if args.temperature is not None and args.temperature < 0:
        raise ArgumentProblem(f"--temperature must be 0 (greedy) or more, not {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ArgumentProblem(f"--top-p must be above 0 and at most 1, not {args.top_p}")


def sampling(args: argparse.Namespace, seeded: bool = True):
    """The sampling flags as the one settings type the page, the CLI and the API share (`seeded=False`:
    without --seed, for a caller that seeds each answer itself)."""
    from model.serving.sampler import SamplingSettings

    return SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            greedy=True if args.greedy else None, seed=args.seed if seeded else None)


def language(args: argparse.Namespace) -> str:
    """--lang, or the terminal's locale (LC_ALL, LC_MESSAGES, LANG)."""
    from model.i18n.catalog import pick

    return args.lang or pick(os.environ.get("LC_ALL"), os.environ.get("LC_MESSAGES"), os.environ.get("LANG"))


class ArgumentProblem(UserFacingError, ValueError):
    """A flag's value that cannot work, said before anything loads (`main` prints it, exit status 2)."""


def check_bundle(weights: str | None) -> None:
    """A --weights folder that is no bundle is said before anything loads."""
    if weights and not (Path(weights) / "manifest.json").is_file():
        what = "does not exist" if not Path(weights).exists() else "is not a SkinGPT bundle (it has no manifest.json)"
        raise ArgumentProblem(f"--weights {weights} {what}; give a bundle folder (see weights/README.md), "
                              f"or leave --weights out for the demo")


def read_history(path: str | None):
    """--history FILE (YAML or JSON) as a ClinicalHistory, or None; a bad file is said with its field."""
    if path is None:
        return None
    import yaml
    from pydantic import ValidationError

    from model.clinical.history import ClinicalHistory
    from model.clinical.records import validation_message

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))  # JSON is YAML
    except OSError as err:
        raise ArgumentProblem(f"--history {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ArgumentProblem(f"--history {path} is not YAML or JSON ({str(err).splitlines()[0]})") from None
    try:
        return ClinicalHistory.model_validate(data or {})
    except ValidationError as err:
        raise ArgumentProblem(f"--history {path}: {validation_message(err)}") from None


HISTORY_HELP = ("the patient's clinical history as YAML or JSON: age, sex, body_site, duration, symptoms, changes, "
                "treatments, fitzpatrick, notes (every field optional; README: 'Clinical history')")


def settings(**flags):
    """The app's settings (SKINGPT_* variables) with the flags given (None: not given) on top: the
    one place a command reads its environment. A bad value is said with its flag and variable."""
    from pydantic import ValidationError

    from app.settings import AppSettings, SettingsError, problems

    try:
        return AppSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as err:
        raise SettingsError(problems(err)) from None


def bundle_path(weights: str | None) -> Path:
    """--weights, or the demo bundle (generated on first use), saying so on stderr."""
    if weights:
        return Path(weights)
    demo = settings().demo_path()
    if not (demo / "manifest.json").is_file():
        from tools.fixtures import write_demo_bundle

        print(f"No --weights given and no demo bundle yet: generating one at {demo} ...", file=sys.stderr)
        write_demo_bundle(demo)
    print("Using the DEMO bundle: random weights, so the answers mean nothing. Pass --weights DIR for a real "
          "model (see weights/README.md).", file=sys.stderr)
    return demo


def policy(args: argparse.Namespace):
    from model.weights.policy import LoadPolicy

    return LoadPolicy(device=args.device, dtype=args.dtype, quantize=args.quantize)


def record(bundle: str | Path) -> Path:
    """Where this user's record of which bundle files already passed their sha256 check lives."""
    return settings().verification_record(bundle)


def engine(args: argparse.Namespace):
    """The bundle of --weights (or the demo), loaded under the flags' policy, behind an engine built
    as the server builds its own (the settings' batch size, KV budget and timeout)."""
    from model.serving.engine import open_engine

    bundle = bundle_path(args.weights)
    options = settings(device=args.device, dtype=args.dtype, quantize=args.quantize).engine_options(bundle)
    quiet = args.weights is None  # the demo's warnings would only distract
    return open_engine(options, say=(lambda line: None) if quiet else (lambda line: print(spell(line, cli=True),
                                                                                          file=sys.stderr)))


def empty_out(out: Path, force: bool = False, hint: str = "choose another --out") -> None:
    if out.exists() and any(out.iterdir()) and not force:
        raise ArgumentProblem(f"{out} exists and is not empty; {hint}")
