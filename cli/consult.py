"""Consultations from a terminal: `ask` (one question, or the structured report) and `chat`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli.common import (HISTORY_HELP, LANGUAGE_HELP, ArgumentProblem, check_bundle, check_sampling, engine, language,
                        model_args, read_history, sampling, sampling_args)
from model.i18n.catalog import LANGUAGES

CHAT_HELP = ("Commands: /image PATH adds a photo, /history FILE sets the clinical history, /new starts a new "
             "consultation, /help shows this, /quit leaves.")


def register(sub) -> None:
    ask = sub.add_parser("ask", help="one question about one photo")
    ask.add_argument("--image", required=True, help="the photo (JPEG, PNG, WebP, GIF, TIFF or BMP)")
    ask.add_argument("--question", help="default: asks for a description, in the chosen language")
    ask.add_argument("--json", action="store_true", help="print the answer and its details as JSON")
    ask.add_argument("--report", action="store_true", help="run the structured consultation and print its report")
    ask.add_argument("--pdf", help="with --report: also write the report as a PDF here")
    ask.add_argument("--lang", choices=LANGUAGES, help=LANGUAGE_HELP)
    ask.add_argument("--history", metavar="FILE", help=HISTORY_HELP)
    model_args(ask)
    sampling_args(ask)
    ask.set_defaults(func=run_ask)

    chat = sub.add_parser("chat", help="a terminal chat that streams")
    chat.add_argument("--image", help="the first photo (or add one with /image PATH)")
    chat.add_argument("--lang", choices=LANGUAGES, help="answer language (default: the terminal's locale)")
    chat.add_argument("--history", metavar="FILE", help=HISTORY_HELP)
    model_args(chat)
    sampling_args(chat)
    chat.set_defaults(func=run_chat)


def run_ask(args: argparse.Namespace) -> int:
    lang = language(args)
    if args.pdf and not args.report:  # everything the arguments can say is said before the model loads
        raise ArgumentProblem("--pdf writes the report: add --report")
    check_bundle(args.weights)
    check_sampling(args)
    history = read_history(args.history)
    image, quality = _intake(args.image, lang, quiet=args.json)
    model = engine(args)
    if args.report:
        return _report(args, model, image, lang, history, quality)
    return _answer(args, model, image, lang, history, quality)


def _report(args: argparse.Namespace, model, image, lang: str, history, quality) -> int:
    from model.clinical.consultation import consult, new_visit

    overrides = sampling(args).overrides()
    report = consult(lambda conv: model.answer(conv, session="ask", **overrides), image, lang=lang,
                     ranking=model.rank([image]), history=history, quality=[quality],
                     details=new_visit(model.loaded.label, [Path(args.image).name]))
    print(report.model_dump_json(indent=2) if args.json else report.markdown())
    if args.pdf:
        from model.clinical.report_pdf import report_pdf

        Path(args.pdf).write_bytes(report_pdf(report, [image.image]))
        print(f"PDF report written to {args.pdf}", file=sys.stderr)
    return 0


def _intake(path: str, lang: str, quiet: bool = False):
    """A photo file as the terminal takes it: decoded (its notes said), its quality checked and said
    at once, so that a patient can retake it before asking; (the image, the quality)."""
    from model.clinical.conversation import ImageInput
    from model.images.decode import read_photo_file
    from model.images.quality import assess

    photo = read_photo_file(path)
    quality = assess(photo.image)
    if not quiet:
        for note in photo.notes:
            print(f"note: {note}", file=sys.stderr)
        if not quality.ok:
            print(f"note: {quality.notice(lang)}", file=sys.stderr)
    return ImageInput.of(photo.image), quality


def _answer(args: argparse.Namespace, model, image, lang: str, history, quality) -> int:
    from model.clinical.consultation import ask_in
    from model.clinical.conversation import Conversation
    from model.clinical.history import with_history
    from model.clinical.ranking import ranking_text
    from model.i18n.catalog import text

    question = args.question or text(lang, "flow.describe")
    conversation = with_history(Conversation().ask(ask_in(lang, question), [image]), history)
    generation = model.stream(conversation, **sampling(args).overrides())
    if args.json:
        answer = "".join(generation)
        result = {"question": question, "answer": answer.strip(), "finish_reason": generation.finish_reason,
                  "notices": generation.notices, "disclaimer": text(lang, "disclaimer"), "language": lang,
                  "photo_quality": quality.model_dump(),
                  "clinical_history": history.model_dump(exclude_defaults=True) if history else None}
        if (ranking := model.rank([image])) is not None:
            result.update(differential=[c.model_dump() for c in ranking.conditions],
                          differential_uncertain=ranking.uncertain)
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    for piece in generation:
        print(piece, end="", flush=True)
    print()
    for notice in generation.notices:
        print(f"note: {notice}", file=sys.stderr)
    if (ranking := model.rank([image])) is not None:
        print(f"\n{ranking_text(ranking, lang)}")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from model.clinical.consultation import ask_in
    from model.clinical.conversation import Conversation
    from model.i18n.catalog import text

    lang = language(args)
    check_bundle(args.weights)
    check_sampling(args)
    history = read_history(args.history)
    first = [_intake(args.image, lang)[0]] if args.image else []
    model = engine(args)
    print(f"{text(lang, 'disclaimer')}\n{CHAT_HELP}", file=sys.stderr)
    conversation, pending = Conversation(), first
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
        command, _, rest = line.partition(" ")
        if line == "/new":
            model.forget("chat")
            conversation, pending, history = Conversation(), [], None
            print("New consultation: everything before is forgotten.", file=sys.stderr)
        elif command == "/image" and rest.strip():
            _add_photo(rest.strip(), pending, lang)
        elif command == "/history" and rest.strip():
            try:
                history = read_history(rest.strip())
                print("Clinical history set; it goes with the first question.", file=sys.stderr)
            except ArgumentProblem as err:
                print(f"error: {err}", file=sys.stderr)
        elif line in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr)
        elif line.startswith("/") and not line.startswith("//"):  # (// sends a message that starts with /)
            print(f"Unknown command {command}. {CHAT_HELP}", file=sys.stderr)
        elif not conversation.images and not pending:
            print("Please add a photo first: /image PATH", file=sys.stderr)
        else:
            line = line[1:] if line.startswith("//") else line
            conversation = _chat_turn(args, model, conversation.ask(ask_in(lang, line), pending), line, lang, history)
            pending = []


def _add_photo(path: str, pending: list, lang: str) -> None:
    from model.errors import UserFacingError

    try:
        pending.append(_intake(path, lang)[0])
        print("Photo added; it goes with your next question.", file=sys.stderr)
    except UserFacingError as err:
        print(f"error: {err}", file=sys.stderr)


def _chat_turn(args: argparse.Namespace, model, conversation, line: str, lang: str, history=None):
    """Stream one answer (Ctrl-C stops it, not the chat); the conversation with the answer added."""
    import threading

    from model.clinical.history import with_history
    from model.clinical.safety import red_flag_notice, red_flags

    cancel = threading.Event()
    generation = model.stream(with_history(conversation, history), session="chat", cancel=cancel,
                              **sampling(args).overrides())
    print("skingpt> ", end="", flush=True)
    try:
        for piece in generation:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        cancel.set()
    print()
    for notice in generation.notices:
        print(f"note: {notice}", file=sys.stderr)
    if flags := red_flags(line, generation.text, lang=lang, also=history.warning_signs() if history else ()):
        print(f"note: {red_flag_notice(flags, lang, markdown=False)}", file=sys.stderr)
    return conversation.answer(generation.text.strip())
