"""Start the app: check settings, route files to the private directory, load, serve on loopback."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from app.settings import AppSettings


def serve(settings: AppSettings, bundle: Path, demo_mode: bool, say: Callable[[str], None] = print,
          block: bool = True):
    settings.check_safe()  # before anything is loaded or bound
    from app.privacy import private_root

    root = private_root()  # before Gradio creates its app, so uploads land in it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # request URLs are not needed in the log

    import torch

    from model.serving.engine import open_engine
    from model.weights.bundle import verification_record
    from model.weights.policy import LoadPolicy

    from app.settings import default_cache_dir
    from app.web.handlers import Handlers, SessionStore
    from app.web.ui import CSS, JS, THEME, build

    policy = LoadPolicy(device=settings.device, dtype=settings.dtype, quantize=settings.quantize)
    say(f"[1/3] verifying and loading {bundle} ...")
    record = verification_record(Path(settings.cache_dir) if settings.cache_dir else default_cache_dir(), bundle)
    kv_bytes = int(settings.kv_cache_gb * 2**30) if settings.kv_cache_gb is not None else None
    engine = open_engine(bundle, policy, record=record, max_batch=settings.max_batch, kv_cache_bytes=kv_bytes,
                         say=(lambda line: None) if demo_mode else (lambda line: say(f"      {line}")))
    loaded = engine.loaded
    say(f"[2/3] model ready on {loaded.device} ({sum(loaded.footprint.values()) / 2**30:.2f} GiB of weights)")
    store = SessionStore(root, settings.session_ttl_s, max_photo_bytes=settings.max_photo_mb * 2**20)
    kept = ("consultations' KV caches in llama.cpp's pool of" if loaded.runtime == "llama.cpp"
            else "idle consultations' KV caches within")
    say(f"      up to {engine.max_batch} answers at once ({loaded.runtime}); {kept} {engine.kv_cache_bytes / 2**30:.1f} GiB")
    handlers = Handlers(engine, store, settings.max_message_chars, out_of_memory=(torch.cuda.OutOfMemoryError,),
                        upload_ttl_s=settings.upload_ttl_s)
    concurrency = settings.concurrency or 2 * engine.max_batch  # beyond the batch, the engine's queue says the place
    app = build(handlers, demo_mode=demo_mode, model_name=loaded.config.name, concurrency=concurrency)
    app.queue(default_concurrency_limit=concurrency)
    _start_sweeper(handlers, every_s=min(60.0, settings.upload_ttl_s / 2))
    say("[3/3] starting the web server ...")
    app.launch(server_name=settings.host, server_port=settings.port, auth=settings.credentials(), share=False,
               theme=THEME, css=CSS, js=JS, max_file_size="25mb", ssr_mode=False, show_error=False, quiet=True,
               prevent_thread_lock=True, enable_monitoring=False, pwa=False, mcp_server=False,
               run_history=False,  # Gradio would otherwise keep every photo and answer in the browser's storage
               footer_links=["api", "settings"])
    if not settings.no_api:
        from app.api.chat import ChatAPI, mount

        mount(app.app, ChatAPI(engine, loaded.config.name), settings.api_key)
        say(f"OpenAI-compatible API at /v1 (model {loaded.config.name!r}"
            f"{', key required' if settings.api_key else ', no key: loopback only'})")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    say(f"SkinGPT is running at http://{host}:{settings.port}/  (private files: {root})")
    if demo_mode:
        say("DEMO MODE: random weights; answers mean nothing.")
    if block:
        app.block_thread()
    return app


def _start_sweeper(handlers, every_s: float) -> None:
    """Wipe consultations left idle past their time to live (a tab closed without notice), and photos
    attached but never sent."""
    def loop() -> None:
        while True:
            time.sleep(every_s)
            handlers.sweep()

    threading.Thread(target=loop, name="session-sweeper", daemon=True).start()
