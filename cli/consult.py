"""Consultations from a terminal: `ask` (one question, or the structured report) and `chat`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli.common import (HISTORY_HELP, LANGUAGE_HELP, ArgumentProblem, check_bundle, check_sampling, engine, language,
                        model_args, read_history, sampling, sampling_args)
from cli.records import open_records, patient_ref, records_args
from model.i18n.catalog import LANGUAGES

SAVE_HELP = "/save keeps this consultation in the records (encrypted)."
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
    records_args(ask)
    ask.add_argument("--patient", type=patient_ref, help="with --records: the clinic's reference for the patient")
    ask.add_argument("--compare-with", metavar="VISIT",
                     help="with --records: compare with this earlier visit's photo (a follow-up)")
    model_args(ask)
    sampling_args(ask)
    ask.set_defaults(func=run_ask)

    chat = sub.add_parser("chat", help="a terminal chat that streams")
    chat.add_argument("--image", help="the first photo (or add one with /image PATH)")
    chat.add_argument("--lang", choices=LANGUAGES, help="answer language (default: the terminal's locale)")
    chat.add_argument("--history", metavar="FILE", help=HISTORY_HELP)
    records_args(chat)
    chat.add_argument("--patient", type=patient_ref, help="with --records: /save keeps the chat under this patient")
    model_args(chat)
    sampling_args(chat)
    chat.set_defaults(func=run_chat)


def run_ask(args: argparse.Namespace) -> int:
    lang = language(args)
    if args.pdf and not args.report:  # everything the arguments can say is said before the model loads
        raise ArgumentProblem("--pdf writes the report: add --report")
    check_visit_args(args)
    check_bundle(args.weights)
    check_sampling(args)
    history = read_history(args.history)
    image, quality = _intake(args.image, lang, quiet=args.json)
    from model.visits.followup import earlier_photo

    store = open_records(args)  # a wrong passphrase stops here, before the model loads
    earlier = earlier_photo(store, args.patient, args.compare_with) if args.compare_with else None
    model = engine(args)
    visit = TerminalVisit(args, lang, history, image, quality, earlier)
    if args.report:
        code = _report(args, model, visit)
    else:
        code = _answer(args, model, visit)
    if store is not None:
        summary = store.save(*visit.record(model.loaded.label))
        print(f"Visit {summary.visit} of patient {summary.patient} saved in {args.records}", file=sys.stderr)
    return code


def check_visit_args(args: argparse.Namespace) -> None:
    """--records, --patient and --compare-with go together; said before anything loads."""
    if getattr(args, "records", None) and not args.patient:
        raise ArgumentProblem("--records keeps the visit under a patient: add --patient REF (e.g. clinic-0042)")
    if args.patient and not getattr(args, "records", None):
        raise ArgumentProblem("--patient names whose visit is kept: add --records DIR")
    if getattr(args, "compare_with", None) and not args.records:
        raise ArgumentProblem("--compare-with takes an earlier visit from the records: add --records DIR")


class TerminalVisit:
    """One terminal consultation as it is shown to the model and, with --records, kept."""

    def __init__(self, args, lang, history, image, quality, earlier) -> None:
        from model.clinical.consultation import new_visit

        self.args, self.lang, self.history, self.image, self.quality, self.earlier = (
            args, lang, history, image, quality, earlier)
        self.details = new_visit("", [Path(args.image).name])
        self.turns: list[tuple[str, str]] = []
        self.flags: list[str] = []
        self.ranking = None
        self.report = None

    def frame(self, conversation):
        """The conversation as the model reads it (`model.visits.followup.shown_to_model`)."""
        from model.visits.followup import shown_to_model

        return shown_to_model(conversation, self.history, self.earlier, self.details.created)

    def also(self, answer: str = "") -> list[str]:
        """Warning-sign ids beyond the answers' own (`model.visits.followup.more_signs`)."""
        from model.visits.followup import more_signs

        return more_signs(self.history, self.earlier, [answer])

    def record(self, model_label: str):
        """(the Visit, its JPEGs) to store: the earlier photo first on a follow-up, then today's."""
        from model.visits.followup import visit_record

        d = self.details
        return visit_record(reference=d.visit, created=d.created, taken=d.created, patient=self.args.patient,
                            lang=self.lang, model=model_label, images=[self.image], qualities=[self.quality],
                            turns=self.turns, history=self.history, ranking=self.ranking, red_flags=self.flags,
                            report=self.report, earlier=self.earlier)


def _report(args: argparse.Namespace, model, visit: TerminalVisit) -> int:
    from model.clinical.consultation import consult, flow
    from model.clinical.safety import red_flags

    overrides = sampling(args).overrides()
    visit.details.model = model.loaded.label
    visit.ranking = model.rank([visit.image])
    steps = flow(visit.lang, compare=visit.earlier is not None)  # a follow-up asks first what changed
    report = consult(lambda conv: model.answer(conv, session="ask", **overrides), visit.image, steps=steps,
                     lang=visit.lang, ranking=visit.ranking, quality=[visit.quality], details=visit.details,
                     frame=visit.frame)
    report.history = visit.history  # (the frame put it into the prompt)
    report.red_flags = red_flags(*report.answers.values(), lang=visit.lang, also=visit.also(report.answers.get("compare", "")))
    visit.turns = [(report.questions[k], report.answers[k]) for k in report.answers]
    visit.flags, visit.report = report.red_flags, report
    print(report.model_dump_json(indent=2) if args.json else report.markdown())
    if args.pdf:
        from model.clinical.report_pdf import report_pdf

        Path(args.pdf).write_bytes(report_pdf(report, [visit.image.image]))
        print(f"PDF report written to {args.pdf}", file=sys.stderr)
    return 0


def _intake(path: str, lang: str, quiet: bool = False, keep: dict | None = None):
    """A photo file as the terminal takes it: decoded (its notes said), its quality checked and said
    at once, so that a patient can retake it before asking; (the image, the quality)."""
    from model.prompt.conversation import ImageInput
    from model.images.intake import take_photo

    photo = take_photo(Path(path))
    if not quiet:
        for line in photo.tell(lang):
            print(f"note: {line}", file=sys.stderr)
    image = ImageInput.of(photo.image)
    if keep is not None:
        keep[image.key] = photo.quality
    return image, photo.quality


def _answer(args: argparse.Namespace, model, visit: TerminalVisit) -> int:
    from model.clinical.consultation import ask_in
    from model.prompt.conversation import Conversation
    from model.clinical.ranking import ranking_text
    from model.clinical.safety import red_flags
    from model.i18n.catalog import text

    lang = visit.lang
    question = args.question or text(lang, "flow.compare" if visit.earlier else "flow.describe")
    conversation = visit.frame(Conversation().ask(ask_in(lang, question), [visit.image]))
    generation = model.stream(conversation, **sampling(args).overrides())
    answer = "".join(generation) if args.json else _printed(generation)
    visit.turns, visit.ranking = [(question, answer.strip())], model.rank([visit.image])
    visit.flags = red_flags(question, answer, lang=lang, also=visit.also(answer))
    if args.json:
        result = {"question": question, "answer": answer.strip(), "finish_reason": generation.finish_reason,
                  "notices": generation.notices, "disclaimer": text(lang, "disclaimer"), "language": lang,
                  "photo_quality": visit.quality.model_dump(), "red_flags": visit.flags,
                  "clinical_history": visit.history.model_dump(exclude_defaults=True) if visit.history else None}
        if visit.ranking is not None:
            result.update(differential=[c.model_dump() for c in visit.ranking.conditions],
                          differential_uncertain=visit.ranking.uncertain)
        if args.records:
            result["visit"] = visit.details.visit
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    for notice in generation.notices:
        print(f"note: {notice}", file=sys.stderr)
    if visit.ranking is not None:
        print(f"\n{ranking_text(visit.ranking, lang)}")
    return 0


def _printed(generation) -> str:
    pieces = []
    for piece in generation:
        pieces.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(pieces)


def run_chat(args: argparse.Namespace) -> int:
    from model.clinical.consultation import ask_in
    from model.prompt.conversation import Conversation
    from model.i18n.catalog import text

    lang = language(args)
    check_visit_args(args)
    check_bundle(args.weights)
    check_sampling(args)
    history = read_history(args.history)
    qualities: dict[str, object] = {}  # photo key -> its quality, for /save
    first = [_intake(args.image, lang, keep=qualities)[0]] if args.image else []
    store = open_records(args)
    model = engine(args)
    print(f"{text(lang, 'disclaimer')}\n{CHAT_HELP}" + (f" {SAVE_HELP}" if store else ""), file=sys.stderr)
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
            _add_photo(rest.strip(), pending, lang, qualities)
        elif line == "/save" and store is not None:
            _save_chat(store, args, model, conversation, qualities, history, lang)
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


def _add_photo(path: str, pending: list, lang: str, qualities: dict) -> None:
    from model.errors import UserFacingError

    try:
        pending.append(_intake(path, lang, keep=qualities)[0])
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


def _save_chat(store, args: argparse.Namespace, model, conversation, qualities: dict, history, lang: str) -> None:
    """/save: the answered turns and their photos, kept as one visit of --patient."""
    from model.clinical.consultation import new_visit
    from model.clinical.safety import red_flags
    from model.visits.followup import more_signs, visit_record

    turns = [(t.question, t.answer) for t in conversation.turns if t.answer is not None]
    if not turns:
        print("Nothing to save yet: ask a question about a photo first.", file=sys.stderr)
        return
    details = new_visit(model.loaded.label)
    images = [image for t in conversation.turns if t.answer is not None for image in t.images]
    flags = red_flags(*(q for q, _ in turns), *(a for _, a in turns), lang=lang, also=more_signs(history, None, []))
    visit, jpegs = visit_record(reference=details.visit, created=details.created, taken=details.created,
                                patient=args.patient, lang=lang, model=details.model, images=images,
                                qualities=[qualities.get(i.key) for i in images], turns=turns, history=history,
                                ranking=model.rank(images[-3:]), red_flags=flags)
    summary = store.save(visit, jpegs)
    print(f"Visit {summary.visit} of patient {summary.patient} saved in {args.records}.", file=sys.stderr)
