"""Consultations from a terminal: `ask` (one question, or the structured report) and `chat`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli.common import LANGUAGE_HELP, engine, language, model_args, sampling, sampling_args
from model.i18n.catalog import LANGUAGES

CHAT_HELP = "Commands: /image PATH adds a photo, /new starts a new consultation, /quit leaves."


def register(sub) -> None:
    ask = sub.add_parser("ask", help="one question about one photo")
    ask.add_argument("--image", required=True, help="the photo (JPEG, PNG, WebP, GIF, TIFF or BMP)")
    ask.add_argument("--question", help="default: asks for a description, in the chosen language")
    ask.add_argument("--json", action="store_true", help="print the answer and its details as JSON")
    ask.add_argument("--report", action="store_true", help="run the structured consultation and print its report")
    ask.add_argument("--pdf", help="with --report: also write the report as a PDF here")
    ask.add_argument("--lang", choices=LANGUAGES, help=LANGUAGE_HELP)
    model_args(ask)
    sampling_args(ask)
    ask.set_defaults(func=run_ask)

    chat = sub.add_parser("chat", help="a terminal chat that streams")
    chat.add_argument("--image", help="the first photo (or add one with /image PATH)")
    chat.add_argument("--lang", choices=LANGUAGES, help="answer language (default: the terminal's locale)")
    model_args(chat)
    sampling_args(chat)
    chat.set_defaults(func=run_chat)


def run_ask(args: argparse.Namespace) -> int:
    from model.clinical.conversation import ImageInput
    from model.images.decode import read_photo_file

    lang = language(args)
    if args.pdf and not args.report:
        raise SystemExit("error: --pdf writes the report: add --report")
    photo = read_photo_file(args.image)
    for note in photo.notes:
        print(f"note: {note}", file=sys.stderr)
    image = ImageInput.of(photo.image)
    model = engine(args)
    if args.report:
        return _report(args, model, image, lang)
    return _answer(args, model, image, lang)


def _report(args: argparse.Namespace, model, image, lang: str) -> int:
    from model.clinical.consultation import consult

    overrides = sampling(args).overrides()
    report = consult(lambda conv: model.answer(conv, session="ask", **overrides), image, lang=lang,
                     ranking=model.rank([image]))
    print(report.model_dump_json(indent=2) if args.json else report.markdown())
    if args.pdf:
        from model.clinical.report_pdf import report_pdf

        Path(args.pdf).write_bytes(report_pdf(report))
        print(f"PDF report written to {args.pdf}", file=sys.stderr)
    return 0


def _answer(args: argparse.Namespace, model, image, lang: str) -> int:
    from model.clinical.consultation import ask_in
    from model.clinical.conversation import Conversation
    from model.clinical.ranking import ranking_text
    from model.i18n.catalog import text

    question = args.question or text(lang, "flow.describe")
    generation = model.stream(Conversation().ask(ask_in(lang, question), [image]), **sampling(args).overrides())
    if args.json:
        answer = "".join(generation)
        result = {"question": question, "answer": answer.strip(), "finish_reason": generation.finish_reason,
                  "notices": generation.notices, "disclaimer": text(lang, "disclaimer"), "language": lang}
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
    from model.clinical.conversation import Conversation, ImageInput
    from model.images.decode import read_image_file
    from model.i18n.catalog import text

    lang = language(args)
    model = engine(args)
    print(f"{text(lang, 'disclaimer')}\n{CHAT_HELP}", file=sys.stderr)
    conversation, pending = Conversation(), [ImageInput.of(read_image_file(args.image))] if args.image else []
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
            model.forget("chat")
            conversation, pending = Conversation(), []
            print("New consultation: everything before is forgotten.", file=sys.stderr)
        elif line.startswith("/image "):
            _add_photo(line.split(" ", 1)[1].strip(), pending)
        elif not conversation.images and not pending:
            print("Please add a photo first: /image PATH", file=sys.stderr)
        else:
            conversation = _chat_turn(args, model, conversation.ask(ask_in(lang, line), pending), line, lang)
            pending = []


def _add_photo(path: str, pending: list) -> None:
    from model.clinical.conversation import ImageInput
    from model.errors import UserFacingError
    from model.images.decode import read_image_file

    try:
        pending.append(ImageInput.of(read_image_file(path)))
        print("Photo added; it goes with your next question.", file=sys.stderr)
    except UserFacingError as err:
        print(f"error: {err}", file=sys.stderr)


def _chat_turn(args: argparse.Namespace, model, conversation, line: str, lang: str):
    """Stream one answer (Ctrl-C stops it, not the chat); the conversation with the answer added."""
    import threading

    from model.clinical.safety import red_flag_notice, red_flags

    cancel = threading.Event()
    generation = model.stream(conversation, session="chat", cancel=cancel, **sampling(args).overrides())
    print("skingpt> ", end="", flush=True)
    try:
        for piece in generation:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        cancel.set()
    print()
    for notice in generation.notices:
        print(f"note: {notice}", file=sys.stderr)
    if flags := red_flags(line, generation.text, lang=lang):
        print(f"note: {red_flag_notice(flags, lang, markdown=False)}", file=sys.stderr)
    return conversation.answer(generation.text.strip())
