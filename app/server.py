"""Start the app: check settings, route files to the private directory, load, serve on loopback.

The HTTP side is one FastAPI app of ours: the /v1 API, then Gradio mounted at /, all behind `Guard`
(host allowlist, same-origin state changes, JSON for the API, bounded bodies), run by uvicorn.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from model.errors import UserFacingError

from app.settings import AppSettings, is_loopback

_BODY_LIMIT = 2 * 2**20  # the page's own requests: a question and its settings


def serve(settings: AppSettings, find_bundle: Callable[[], Path], demo_mode: bool, say: Callable[[str], None] = print,
          block: bool = True, open_records: Callable[[], object] | None = None):
    """Check the settings are safe and the port free, open the kept visits (`open_records`: unlocks a
    VisitStore, asking for its passphrase), find the bundle (`find_bundle`: the demo is generated on
    first use), load it, serve it. Everything that can be refused is, before the load."""
    settings.check_safe()  # before anything is loaded or bound
    check_port(settings.host, settings.port)  # a taken port is said now, not after the model loads
    keys = settings.api_keys() if not settings.no_api else []
    records = open_records() if open_records is not None else None
    bundle = find_bundle()
    from app.privacy import private_root

    root = private_root()  # before Gradio creates its app, so uploads land in it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # request URLs are not needed in the log

    import torch

    from app.web.handlers import Handlers, SessionStore
    from app.web.ui import build, drop_replaced_components
    from app.web.uploads import Uploads

    engine = _open_engine(settings, bundle, demo_mode, say)
    loaded = engine.loaded
    store = SessionStore(root, settings.session_ttl_s, max_photo_bytes=settings.max_photo_mb * 2**20)
    uploads = Uploads(root)
    handlers = Handlers(engine, store, settings.max_message_chars, out_of_memory=(torch.cuda.OutOfMemoryError,),
                        upload_ttl_s=settings.upload_ttl_s, uploads=uploads, model_label=loaded.label)
    concurrency = settings.concurrency or 2 * engine.max_batch  # beyond the batch, the engine's queue says the place
    desk = _visit_desk(settings, records, store, loaded.label, say)
    blocks = build(handlers, demo_mode=demo_mode, model_name=loaded.config.name, concurrency=concurrency, desk=desk)
    blocks.queue(default_concurrency_limit=concurrency)
    app = _http_app(settings, blocks, engine, keys, store, uploads,
                    photo_room=lambda n: store.photo_bytes() + n <= store.max_photo_bytes)
    _start_sweeper(handlers, every_s=min(60.0, settings.upload_ttl_s / 2),
                   purge=(lambda: desk.records.purge(settings.retain_days)) if desk and settings.retain_days else None,
                   tidy=lambda: drop_replaced_components(blocks))
    say("[3/3] starting the web server ...")
    server = _run_server(app, settings.host, settings.port)
    if not settings.no_api:
        say(f"OpenAI-compatible API at /v1 (model {loaded.config.name!r}, "
            f"{_key_line(keys)})")
    if settings.api_key_file or settings.api_key:
        say("      the API key guards /v1 only; the web page asks for --auth (a password) when one is set")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    say(f"SkinGPT is running at http://{host}:{settings.port}/  (private files: {root})")
    if demo_mode:
        say("DEMO MODE: random weights; answers mean nothing.")
    if block:
        while server.started and not server.should_exit:
            time.sleep(0.5)
    return server


def _open_engine(settings: AppSettings, bundle: Path, demo_mode: bool, say: Callable[[str], None]):
    """The engine the settings ask for: a vLLM server's (--engine-url), or ours over the bundle; said
    step by step."""
    from model.serving.engine import open_engine

    if settings.engine_url:
        from app.remote_engine import open_remote

        say(f"[1/3] verifying {bundle} (its config, tokenizer and template; the LLM runs on the engine) ...")
        return open_remote(bundle, settings, record=settings.verification_record(bundle),
                           say=lambda line: say(f"      {line}"))
    say(f"[1/3] verifying and loading {bundle} ...")
    engine = open_engine(settings.engine_options(bundle, hold=_gate(settings.test_decode_gate)),
                         say=(lambda line: None) if demo_mode else (lambda line: say(f"      {line}")))
    loaded = engine.loaded
    say(f"[2/3] model ready on {loaded.device} ({sum(loaded.footprint.values()) / 2**30:.2f} GiB of weights)")
    if loaded.runtime == "llama.cpp":
        import llama_cpp

        from model.serving.llama_backend import cpu_variant, uses_openmp

        say(f"      llama.cpp's CPU code: {_variant_line(cpu_variant())}")
        if uses_openmp(llama_cpp):
            say("      warning: this llama.cpp was built with OpenMP, which shares PyTorch's thread runtime and "
                "decodes about 20% slower beside the photo encoder; pip's wheel cache still holds that build. "
                f"Rebuild it: {sys.executable} -m pip cache remove llama_cpp_python && {sys.executable} -m pip "
                "install --force-reinstall --no-deps $(grep ^llama-cpp-python requirements.txt)")
    kept = ("consultations' KV caches in llama.cpp's pool of" if loaded.runtime == "llama.cpp"
            else "idle consultations' KV caches within")
    say(f"      up to {engine.max_batch} answers at once ({loaded.runtime}); {kept} "
        f"{engine.kv_cache_bytes / 2**30:.1f} GiB")
    return engine


def _variant_line(variant: str) -> str:
    if variant == "native":
        return "built for this machine's CPU when it was installed (GGML_NATIVE)"
    return f"{variant} (picked for this CPU at start-up from the image's runtime-dispatch build)"


def _gate(path: str | None) -> Callable[[], bool] | None:
    """The test hook SKINGPT_TEST_DECODE_GATE: decoding holds while its file exists."""
    return None if path is None else Path(path).exists


def _key_line(keys: list[str]) -> str:
    if not keys:
        return "no key: loopback only; cached prefixes shared only by requests with the same prompt_cache_key"
    if len(keys) == 1:
        return "key required; cached prefixes shared only by requests with the same prompt_cache_key"
    return f"{len(keys)} keys, each caller's cached prefixes its own"


def _http_app(settings: AppSettings, blocks, engine, keys: list[str], store, uploads,
              photo_room: Callable[[int], bool]):
    """Our FastAPI app: the API, Gradio at /, our upload route, no CORS unless configured, behind Guard."""
    import gradio as gr
    from fastapi import FastAPI
    from fastapi.middleware.cors import CORSMiddleware

    from model.images.decode import MAX_BYTES

    from app.api.chat import API_PREFIX, MAX_BODY_BYTES, APIError, ChatAPI, error_response, router
    from app.guard import Guard, HostPolicy, Limits
    from app.web.ui import CSS, JS, THEME
    from app.privacy import SESSIONS
    from app.web.files import OwnFiles
    from app.web.uploads import own_upload_route

    from app.settings import MAX_PHOTOS

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    # Configured here, the parent's CORS layer replaces Gradio's own (which lets any page on localhost in).
    app.add_middleware(CORSMiddleware, allow_origins=settings.origins(), allow_methods=["GET", "POST"],
                       allow_headers=["authorization", "content-type"])
    app.add_exception_handler(APIError, error_response)
    app.add_exception_handler(Exception, error_response)
    if not settings.no_api:
        app.include_router(router(ChatAPI(engine, engine.config.name, callers_apart=len(keys) > 1,
                                          photo_room=photo_room), keys))
    own_upload_route(app, blocks, uploads, gradio_app=lambda: _gradio_app(app))  # before the mount: it answers first
    gr.mount_gradio_app(
        app, blocks, path="", server_name=settings.host, server_port=settings.port, auth=settings.credentials(),
        footer_links=["api", "settings"], theme=THEME, css=CSS, js=JS, max_file_size=MAX_BYTES,
        ssr_mode=False, show_error=False, enable_monitoring=False, pwa=False, mcp_server=False,
        run_history=False)  # Gradio would otherwise keep every photo and answer in the browser's storage
    hosts = HostPolicy.for_server(settings.host, settings.host_names(), loopback=is_loopback(settings.host))
    limits = Limits(_BODY_LIMIT, {API_PREFIX: MAX_BODY_BYTES, "/gradio_api/upload": MAX_PHOTOS * MAX_BYTES + 2**20})
    owned = OwnFiles(app, uploads.root, lambda area, folder: (store if area == SESSIONS else uploads).owner(folder))
    return Guard(owned, hosts, limits, origins=settings.origins(), json_only=(API_PREFIX,))


def _gradio_app(app):
    from starlette.routing import Mount

    for route in app.routes:
        if isinstance(route, Mount):
            return route.app
    raise RuntimeError("Gradio was not mounted")


class PortTaken(UserFacingError, OSError):
    """The port to listen on is another program's (said before the model loads where it can be)."""

    def __init__(self, host: str, port: int, why: str) -> None:
        super().__init__(f"cannot listen on {host}:{port} ({why}): another program is using the port; choose "
                         f"another with --port N or SKINGPT_PORT=N")


def check_port(host: str, port: int) -> None:
    """Refuse, in one plain line, a port another program already listens on."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as err:
            raise PortTaken(host, port, err.strerror) from None


def _run_server(app, host: str, port: int):
    """uvicorn in a thread; returns once it listens (or says why it cannot)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="http-server", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise PortTaken(host, port, "uvicorn could not bind it")
        time.sleep(0.05)
    return server


def _visit_desk(settings: AppSettings, records, store, label: str, say: Callable[[str], None]):
    """The page's kept visits in `records` (the unlocked VisitStore of --records; None without it);
    visits past --retain-days go now."""
    if records is None:
        return None
    from app.web.visits import VisitDesk

    gone = records.purge(settings.retain_days) if settings.retain_days else 0
    kept = f"kept {settings.retain_days} days" if settings.retain_days else "kept until deleted"
    say(f"      visits are saved (on Save visit only) encrypted in {settings.records}, {kept}"
        + (f"; {gone} older visit(s) deleted" if gone else ""))
    return VisitDesk(store, records, label)


def _start_sweeper(handlers, every_s: float, purge: Callable[[], int] | None = None,
                   tidy: Callable[[], int] | None = None) -> None:
    """Wipe consultations left idle past their time to live (a tab closed without notice), and photos
    attached but never sent; `tidy` what the web framework leaves behind; then hand freed native memory
    back to the system. Daily, `purge` the visits past their retention."""
    trim = _native_heap()
    purged = time.monotonic()

    def loop() -> None:
        nonlocal purged
        while True:
            time.sleep(every_s)
            handlers.sweep()
            if tidy is not None:
                tidy()
            if purge is not None and time.monotonic() - purged > 24 * 3600:
                purged = time.monotonic()
                gone = purge()
                if gone:
                    logging.getLogger("skingpt.app").info("retention: %d visit(s) deleted", gone)
            if trim is not None:
                trim(0)

    threading.Thread(target=loop, name="session-sweeper", daemon=True).start()


def _native_heap():
    """glibc malloc capped at two arenas; its `malloc_trim` (None on another C library).

    glibc gives threads that allocate at once arenas of their own (up to 8 per core) and keeps what
    they free for reuse. Serving allocates tensors from many threads (the scheduler, photo encoders,
    the web server's workers), so RSS crept up with no Python object behind it. The soak (same load,
    same 0.25 GB KV budget, 30 minutes) measured the difference: see README, "Memory over hours"."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
