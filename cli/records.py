"""`records list|show|export|delete`, and the --records flags `ask`, `chat` and `serve` share.

The passphrase comes from --records-passphrase-file, SKINGPT_RECORDS_PASSPHRASE or the terminal
(asked without echo), never from the command line, and it is never printed or logged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cli.common import ArgumentProblem

PASSPHRASE_VARIABLE = "SKINGPT_RECORDS_PASSPHRASE"
RECORDS_HELP = "keep visits here, encrypted (off by default: nothing is kept after a consultation)"


def records_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--records", metavar="DIR", required=required, help=RECORDS_HELP)
    p.add_argument("--records-passphrase-file", metavar="FILE",
                   help=f"the records' passphrase, read from this file (or set {PASSPHRASE_VARIABLE}, or be asked)")
    p.add_argument("--retain-days", type=int, metavar="N",
                   help="delete visits older than N days when the records open (default: keep them)")


def passphrase(args: argparse.Namespace) -> str:
    """The records' passphrase: the file, the environment, or the terminal (not echoed)."""
    return passphrase_for(args.records, args.records_passphrase_file)


def passphrase_for(records: str, passphrase_file: str | None) -> str:
    if passphrase_file:
        try:
            return Path(passphrase_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as err:
            raise ArgumentProblem(f"--records-passphrase-file {passphrase_file}: {err.strerror}") from None
    if os.environ.get(PASSPHRASE_VARIABLE):
        return os.environ[PASSPHRASE_VARIABLE]
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(f"Passphrase for the records in {records}: ")
    raise ArgumentProblem(f"--records needs its passphrase: give --records-passphrase-file FILE or set "
                          f"{PASSPHRASE_VARIABLE} (it is never taken on the command line)")


def open_records(args: argparse.Namespace):
    """The records of --records (None without it), unlocked, old visits purged under --retain-days."""
    if not getattr(args, "records", None):
        return None
    if args.retain_days is not None and args.retain_days < 1:
        raise ArgumentProblem(f"--retain-days must be 1 or more, not {args.retain_days}")
    from model.visits.store import VisitStore

    store = VisitStore(args.records, passphrase(args))
    if args.retain_days is not None and (gone := store.purge(args.retain_days)):
        print(f"{gone} visit(s) older than {args.retain_days} days deleted from the records", file=sys.stderr)
    return store


def patient_ref(value: str) -> str:
    """--patient: the clinic's own reference, checked while the arguments are read."""
    from model.visits.visit import check_reference

    try:
        return check_reference(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def register(sub) -> None:
    records = sub.add_parser("records", help="the kept visits: list, show, export (FHIR) or delete")
    actions = records.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the visits, newest first")
    listing.add_argument("--patient", type=patient_ref, help="only this patient's visits")
    show = actions.add_parser("show", help="one visit in full")
    export = actions.add_parser("export", help="one visit as an HL7 FHIR R4 Bundle (the referral)")
    delete = actions.add_parser("delete", help="delete a visit, or every visit of a patient (for good)")
    for p in (show, export):
        p.add_argument("--visit", required=True, help="the visit reference (`records list` shows them)")
    export.add_argument("--fhir", required=True, metavar="OUT.json", help="write the Bundle here")
    target = delete.add_mutually_exclusive_group(required=True)
    target.add_argument("--visit", help="the visit to delete")
    target.add_argument("--patient", type=patient_ref, help="delete every visit of this patient")
    for p in (listing, show, export, delete):
        records_args(p, required=True)
        if p is not delete and p is not export:
            p.add_argument("--json", action="store_true", help="print JSON")
    records.set_defaults(func=run_records)


def run_records(args: argparse.Namespace) -> int:
    store = open_records(args)
    return {"list": _list, "show": _show, "export": _export, "delete": _delete}[args.action](args, store)


def _list(args: argparse.Namespace, store) -> int:
    summaries = store.summaries(args.patient)
    if args.json:
        print(json.dumps([s.model_dump(exclude={"thumbnail"}) for s in summaries], indent=2, ensure_ascii=False))
        return 0
    if not summaries:
        print("No visits" + (f" for patient {args.patient}" if args.patient else "") + ".", file=sys.stderr)
    for s in summaries:
        signs = f"  warning signs: {'; '.join(s.red_flags)}" if s.red_flags else ""
        print(f"{s.visit}  {s.created}  patient {s.patient}  site {s.body_site or '-'}  {s.photos} photo(s){signs}")
    return 0


def _show(args: argparse.Namespace, store) -> int:
    visit, jpegs = store.load(args.visit)
    if args.json:
        print(visit.model_dump_json(indent=2))
        return 0
    print(f"Visit {visit.visit} of patient {visit.patient}, {visit.created}, {len(jpegs)} photo(s)")
    if visit.compared_with:
        print(f"Compared with visit {visit.compared_with}")
    print(visit.report.markdown() if visit.report else "\n\n".join(f"Q: {t.question}\nA: {t.answer}" for t in visit.turns))
    return 0


def _export(args: argparse.Namespace, store) -> int:
    from model.visits.fhir import referral

    visit, jpegs = store.load(args.visit)
    data = json.dumps(referral(visit, jpegs), indent=1).encode()
    fd = os.open(args.fhir, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the photos: the user's alone
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    print(f"FHIR Bundle of visit {visit.visit} written to {args.fhir} (it holds the photos and the history: "
          f"send it only to the clinician it is for)", file=sys.stderr)
    return 0


def _delete(args: argparse.Namespace, store) -> int:
    if args.visit:
        if not store.delete(args.visit):
            raise ArgumentProblem(f"no visit {args.visit} in these records; `launch.py records list` shows them")
        print(f"Visit {args.visit} deleted.", file=sys.stderr)
    else:
        print(f"{store.delete_patient(args.patient)} visit(s) of patient {args.patient} deleted.", file=sys.stderr)
    return 0
