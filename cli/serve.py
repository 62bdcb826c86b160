"""`serve` (the default command): the web app and its API."""

from __future__ import annotations

import argparse

from cli.common import bundle_path, device_name, settings
from model.choices import DTYPES, QUANTIZE, QUANTIZE_HELP
from model.errors import spell
from cli.records import passphrase_for, records_args


def register(sub) -> None:
    serve = sub.add_parser("serve", help="serve the web app (the default); flags also as SKINGPT_* variables")
    serve.add_argument("--weights", help="bundle directory (default: the demo bundle, random weights)")
    serve.add_argument("--quantize", choices=QUANTIZE, help=QUANTIZE_HELP)
    serve.add_argument("--device", type=device_name, help="auto | cpu | cuda | cuda:N")
    serve.add_argument("--dtype", choices=DTYPES, help="precision of the weights (default: auto)")
    serve.add_argument("--host", help="default 127.0.0.1; any other address needs --auth")
    serve.add_argument("--port", type=int, help="default 7860")
    serve.add_argument("--auth", help="user:password, required off loopback")
    serve.add_argument("--api-key", action="append",
                       help="bearer key of the OpenAI-compatible API; repeat it (or comma-separate keys) for one key "
                            "per caller, each with a prefix cache of its own (better: SKINGPT_API_KEY or "
                            "--api-key-file, which other users cannot read in the process list); required off loopback")
    serve.add_argument("--api-key-file", help="a file of API keys, one a line ('#' starts a comment)")
    serve.add_argument("--allowed-hosts", help="comma-separated host names the server answers to besides loopback "
                                               "and --host (a reverse proxy's name); * for any")
    serve.add_argument("--cors-origins", help="comma-separated origins (https://app.example) whose pages may call "
                                              "the server; default none")
    serve.add_argument("--request-timeout-s", type=float, help="longest one answer may take, queue included "
                                                               "(default 600)")
    serve.add_argument("--no-api", action="store_true", help="no /v1 API, the web page only")
    serve.add_argument("--engine-url", help="answer through a vLLM server's OpenAI API (http://host:port/v1) "
                                            "serving `launch.py export-vllm`'s directory of the same bundle")
    serve.add_argument("--engine-key", help="that server's --api-key (better: SKINGPT_ENGINE_KEY, which the "
                                            "process list does not show)")
    serve.add_argument("--engine-model", help="the served model name (default: the one the engine lists)")
    records_args(serve)
    serve.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from app.server import serve

    names = ("weights", "quantize", "device", "dtype", "host", "port", "auth", "api_key_file", "allowed_hosts",
             "cors_origins", "request_timeout_s", "engine_url", "engine_key", "engine_model", "records",
             "records_passphrase_file", "retain_days")
    flags = {k: getattr(args, k) for k in names}
    flags["api_key"] = ",".join(args.api_key) if args.api_key else None
    flags["no_api"] = True if args.no_api else None
    chosen = settings(**flags)

    def records():  # a wrong passphrase is said before the model loads
        from model.visits.store import VisitStore

        return VisitStore(chosen.records, passphrase_for(chosen.records, chosen.records_passphrase_file))

    serve(chosen, lambda: bundle_path(chosen.weights), demo_mode=chosen.weights is None,
          say=lambda line: print(spell(line, cli=True), flush=True), open_records=records if chosen.records else None)
    return 0
