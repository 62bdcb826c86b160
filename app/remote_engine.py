"""Answers from a vLLM server (`serve --engine-url`), behind the same stream/answer/forget the app uses.

The page, our /v1, history, photo checks, red flags and reports stay in this process; only the
prompt goes out: the conversation as OpenAI messages, which the exported chat template renders
into exactly the prompt our own engine would (`model.weights.vllm_export`). Which old turns keep
their text is decided here, by our own prompt builder on the bundle's tokenizer, so a long
consultation drops the same turns on both engines. Photos travel as lossless PNG of the pixels our
own photo pipeline produced (EXIF already gone), so vLLM preprocesses the same pixels.

Every byte that comes back is treated as hostile: one SSE line is at most 1 MiB, an answer at most
`_MAX_CHARS_PER_TOKEN` characters a token, JSON fields are type-checked, and what is shown passes
through the same printable filter as our own engine's text. Stop, a closed tab or an API client
that hangs up closes the HTTP stream, which vLLM takes as an abort of the request.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx

from model.prompt.conversation import Conversation, ConversationError, ImageInput, Template, template
from model.errors import UserFacingError
from model.nn.config import SkinGPTConfig
from model.serving.detokenize import printable
from model.serving.prompt import PromptBuilder, context_budget, dropped_notice
from model.serving.requests import GenerationStats

log = logging.getLogger("skingpt.remote")

_MAX_LINE = 2**20  # one server-sent event line
_MAX_CHARS_PER_TOKEN = 64  # a token is never longer than this many characters of text
_PNG_CACHE = 32  # photos kept encoded, so that a follow-up does not encode them again


class EngineUnavailable(UserFacingError, RuntimeError):
    """The remote engine is down, refused the request, or answered something that is not an answer."""

    http_status = 502  # what our /v1 answers its own callers: a bad gateway, not a bad request


@dataclass
class RemoteLoaded:
    """What the server's start-up lines read of a loaded bundle, for a bundle whose LLM runs elsewhere."""

    config: SkinGPTConfig
    label: str
    url: str
    device: str = "remote"
    runtime: str = "vLLM"
    footprint: dict[str, int] = field(default_factory=dict)


class _Counter:
    """`scheduler.queued` for the API's queue bound: answers in flight beyond the batch size."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch, self.active, self._lock = max_batch, 0, threading.Lock()

    @property
    def queued(self) -> int:
        return max(0, self.active - self.max_batch)

    def add(self, n: int) -> None:
        with self._lock:
            self.active += n


class RemoteEngine:
    def __init__(self, config: SkinGPTConfig, tokenizer: Any, url: str, *, key: str | None = None,
                 model: str | None = None, label: str = "", max_batch: int = 8,
                 request_timeout_s: float | None = None, connect_timeout_s: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise EngineUnavailable(f"--engine-url must start with http:// or https://, not {url[:40]!r}")
        self.url = url.rstrip("/")
        self.config, self.tokenizer = config, tokenizer
        self.template: Template = template(config.prompt_template)
        self.request_timeout_s = request_timeout_s
        self.prompt = PromptBuilder(self.template, tokenizer, config.image_placeholder,
                                    config.qformer.num_query_tokens, config.generation.max_context)
        self.scheduler = _Counter(max_batch)
        self.kv_cache_bytes = 0  # vLLM holds the KV cache (and its prefix cache) on its side
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(headers=headers, follow_redirects=False, trust_env=False,
                                    timeout=httpx.Timeout(connect=connect_timeout_s, read=None, write=60.0, pool=None))
        self.model = model or "skingpt"
        self.loaded = RemoteLoaded(config, label or config.name, self.url)
        self._png: OrderedDict[str, str] = OrderedDict()
        self._png_lock = threading.Lock()

    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    # -- the engine's interface -------------------------------------------------------------------
    def probe(self) -> str:
        """GET /models: the served model's name, or EngineUnavailable saying what to do."""
        try:
            response = self._client.get(f"{self.url}/models")
        except httpx.HTTPError as err:
            raise self._down(err) from None
        body = self._json(response)
        names = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)] if isinstance(body, dict) else []
        names = [n for n in names if isinstance(n, str)]
        if not names:
            raise EngineUnavailable(f"the engine at {self.url} lists no model")
        if self.model not in names:
            self.model = names[0]
        return self.model

    def stream(self, conversation: Conversation, *, session: str | None = None, seed: int | None = None,
               cancel: threading.Event | None = None, fixed_length: bool = False, stop: tuple[str, ...] = (),
               prefix_cache: str | None = None, **overrides) -> RemoteGeneration:
        try:
            settings = dataclasses.replace(self.config.generation, **overrides)
        except TypeError as err:
            raise ConversationError(f"unknown generation setting: {err}") from None
        budget = context_budget(settings.max_context, self.config.llm.max_position_embeddings, settings.max_new_tokens)
        _, _, dropped = self.prompt.positions(conversation, budget)
        body = {"model": self.model, "messages": self.messages(conversation, frozenset(dropped)), "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": settings.max_new_tokens,
                "return_token_ids": True, "skip_special_tokens": True,
                # vLLM shares cached prefixes only between requests of one salt: one consultation, one API family
                "cache_salt": hashlib.sha256((prefix_cache or session or "").encode()).hexdigest()[:32]}
        if settings.do_sample:
            body |= {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k or -1}
        else:
            body["temperature"] = 0.0
        if settings.repetition_penalty != 1.0:
            body["repetition_penalty"] = settings.repetition_penalty
        if seed is not None:
            body["seed"] = int(seed)
        if fixed_length:
            body["ignore_eos"] = True
        else:
            body["stop"] = list(self.template.stop + tuple(stop))
        return RemoteGeneration(self, body, cancel, dropped, settings.max_new_tokens)

    def answer(self, conversation: Conversation, **kwargs) -> str:
        return "".join(self.stream(conversation, **kwargs))

    def forget(self, session: str) -> None:
        """Nothing to drop here: vLLM's prefix cache evicts by itself, and the salt keeps it apart."""

    def forget_images(self, keys: list[str] | None = None) -> None:
        with self._png_lock:
            for key in list(self._png) if keys is None else keys:
                self._png.pop(key, None)

    def rank(self, images: list[ImageInput]) -> None:
        """No differential: the image encoder runs on the vLLM server, which serves text only."""
        return None

    def close(self) -> None:
        self._client.close()

    # -- what goes out ------------------------------------------------------------------------------
    def messages(self, conversation: Conversation, dropped: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
        """The turns as OpenAI messages, in the order `render` writes them: a dropped turn keeps
        only its photos (a user message with no text) and loses its answer."""
        out: list[dict[str, Any]] = []
        for i, turn in enumerate(conversation.turns):
            turn = self.prompt.plain(turn)  # a typed placeholder is text (vLLM's tokenizer would take it as a photo)
            if i in dropped and not turn.images:
                continue
            parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": self._data_url(img)}}
                                           for img in turn.images]
            if i not in dropped:
                parts.append({"type": "text", "text": turn.question})
            out.append({"role": "user", "content": parts})
            if turn.answer is not None and i not in dropped:
                out.append({"role": "assistant", "content": turn.answer})
        return out

    def _data_url(self, image: ImageInput) -> str:
        with self._png_lock:
            if image.key in self._png:
                self._png.move_to_end(image.key)
                return self._png[image.key]
        buffer = io.BytesIO()
        image.image.save(buffer, format="PNG")  # lossless: vLLM sees the pixels our pipeline made
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        with self._png_lock:
            self._png[image.key] = url
            while len(self._png) > _PNG_CACHE:
                self._png.popitem(last=False)
        return url

    # -- what comes back ----------------------------------------------------------------------------
    def _down(self, err: Exception) -> EngineUnavailable:
        log.warning("remote engine unreachable reason=%s", type(err).__name__)
        return EngineUnavailable(f"The answering engine at {self.url} is not reachable ({type(err).__name__}). "
                                 f"Start it (`vllm serve DIR`, see the README's Deployment section) or check "
                                 f"--engine-url; the consultation is kept, ask again once it is up.")

    def _json(self, response: httpx.Response) -> Any:
        raw = response.read()[:_MAX_LINE]
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if response.status_code != 200:
            raise self._refused(response.status_code, body)
        return body

    def _refused(self, status: int, body: Any) -> EngineUnavailable:
        message = ""
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = printable(str(body["error"].get("message", "")))[:300]
        elif isinstance(body, dict) and isinstance(body.get("message"), str):
            message = printable(body["message"])[:300]
        log.warning("remote engine refused status=%d", status)
        if status in (401, 403):
            return EngineUnavailable(f"The answering engine at {self.url} refused our key (HTTP {status}): set "
                                     f"--engine-key (or SKINGPT_ENGINE_KEY) to the key `vllm serve --api-key` uses.")
        return EngineUnavailable(f"The answering engine at {self.url} answered HTTP {status}"
                                 f"{': ' + message if message else ''}. The consultation is kept; try again.")


class RemoteGeneration:
    """`model.serving.engine.Generation`'s surface over one streamed chat completion."""

    def __init__(self, engine: RemoteEngine, body: dict[str, Any], cancel: threading.Event | None,
                 dropped: tuple[int, ...], max_new_tokens: int) -> None:
        self.text = ""
        self.tokens: list[int] = []
        self.produced = 0
        self.finish_reason: str | None = None
        self.notices: list[str] = []
        self.stats = GenerationStats(dropped_turns=tuple(dropped))
        if dropped:
            self.notices.append(dropped_notice(len(dropped)))
        self._engine, self._body, self._cancel = engine, body, cancel
        self._max_chars = max_new_tokens * _MAX_CHARS_PER_TOKEN
        self._response: httpx.Response | None = None
        self._closed = threading.Event()
        self._events = self._run()
        self._texts = (value for kind, value in self._events if kind == "text")

    def __iter__(self) -> Iterator[str]:
        return self._texts

    def __next__(self) -> str:
        return next(self._texts)

    def events(self) -> Iterator[tuple[str, object]]:
        return self._events

    def close(self) -> None:
        """Stop early: closing the HTTP stream aborts the request on vLLM. Safe from any thread."""
        self._closed.set()
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
        response = self._response
        if response is not None:
            response.close()

    def _stopped(self) -> bool:
        return self._closed.is_set() or (self._cancel is not None and self._cancel.is_set())

    def _run(self) -> Iterator[tuple[str, object]]:
        engine, start = self._engine, time.perf_counter()
        deadline = start + engine.request_timeout_s if engine.request_timeout_s else None
        engine.scheduler.add(1)
        try:
            request = engine._client.build_request("POST", f"{engine.url}/chat/completions", json=self._body)
            try:
                self._response = engine._client.send(request, stream=True)
            except httpx.HTTPError as err:
                raise engine._down(err) from None
            if self._response.status_code != 200:
                engine._json(self._response)  # raises the refusal, in the engine's own words
            yield from self._read(start, deadline)
        except httpx.HTTPError as err:
            if not self._stopped():
                raise engine._down(err) from None
        finally:
            engine.scheduler.add(-1)
            if self._response is not None:
                self._response.close()
            if self.finish_reason is None:
                self.finish_reason = "cancelled"
            self.produced = max(self.produced, len(self.tokens))

    def _read(self, start: float, deadline: float | None) -> Iterator[tuple[str, object]]:
        stats, last = self.stats, start
        for line in self._response.iter_lines():
            if self._stopped():
                self.finish_reason = "cancelled"
                return
            if deadline is not None and time.perf_counter() > deadline:
                self.finish_reason = "timeout"
                return
            if len(line) > _MAX_LINE:
                raise self._bad("an event line over 1 MiB")
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            piece, ids, reason, usage = self._parse(data)
            if usage:
                stats.prompt_tokens = usage.get("prompt_tokens", 0)
                stats.reused_tokens = usage.get("cached_tokens", 0)
                stats.prefill_tokens = stats.prompt_tokens - stats.reused_tokens
            now = time.perf_counter()
            if ids:
                if not self.tokens:
                    stats.time_to_first_token_s = now - start
                self.tokens += ids
                stats.token_times += [now] * len(ids)
                last = now
            if piece:
                piece = printable(piece)
                self.text += piece
                if len(self.text) > self._max_chars:
                    raise self._bad("more text than the tokens asked for can hold")
            self.produced = len(self.tokens)
            if piece:
                yield "text", piece
            if reason is not None:
                self.finish_reason = {"stop": "stop", "length": "length", "abort": "cancelled"}.get(reason, "stop")
        stats.new_tokens = len(self.tokens)
        stats.decode_s = last - start - stats.time_to_first_token_s if self.tokens else 0.0
        if self.finish_reason is None:
            self.finish_reason = "stop"

    def _parse(self, data: str) -> tuple[str, list[int], str | None, dict[str, int]]:
        try:
            event = json.loads(data)
        except ValueError:
            raise self._bad("an event that is not JSON") from None
        if not isinstance(event, dict):
            raise self._bad("an event that is not an object")
        if isinstance(event.get("error"), dict):
            raise self._engine._refused(500, event)
        usage: dict[str, int] = {}
        raw_usage = event.get("usage")
        if isinstance(raw_usage, dict):
            details = raw_usage.get("prompt_tokens_details")
            cached = details.get("cached_tokens") if isinstance(details, dict) else 0
            usage = {k: v for k, v in (("prompt_tokens", raw_usage.get("prompt_tokens")), ("cached_tokens", cached))
                     if isinstance(v, int) and v >= 0}
        choices = event.get("choices") or []
        if not isinstance(choices, list) or not choices:
            return "", [], None, usage
        choice = choices[0]
        if not isinstance(choice, dict):
            raise self._bad("a choice that is not an object")
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        piece = delta.get("content") or ""
        ids = choice.get("token_ids") or delta.get("token_ids") or []
        reason = choice.get("finish_reason")
        if not isinstance(piece, str) or not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise self._bad("a piece of text or token ids of the wrong type")
        if reason is not None and not isinstance(reason, str):
            raise self._bad("a finish reason that is not text")
        return piece, ids, reason, usage

    def _bad(self, what: str) -> EngineUnavailable:
        log.warning("remote engine sent a malformed answer: %s", what)
        return EngineUnavailable(f"The answering engine at {self._engine.url} sent {what}; the answer was "
                                 f"stopped. The consultation is kept; try again.")


def open_remote(bundle, settings, *, record=None, say=print) -> RemoteEngine:
    """The bundle's config and tokenizer (hash-checked), an engine client for settings.engine_url,
    and one probe of it; an engine that is down now is said, and the app starts all the same."""
    from model.nn.llm import load_tokenizer
    from model.weights.bundle import LLM_DIR, load_config, manifest_hash, verify_bundle

    manifest = verify_bundle(bundle, record)
    config = load_config(bundle)
    label = " · ".join(p for p in (config.name, manifest_hash(manifest)[:12], "vLLM") if p)
    engine = RemoteEngine(config, load_tokenizer(bundle / LLM_DIR), settings.engine_url, key=settings.engine_key,
                          model=settings.engine_model, label=label, max_batch=settings.max_batch,
                          request_timeout_s=settings.request_timeout_s)
    try:
        name = engine.probe()
        say(f"[2/3] answers come from the vLLM server at {engine.url} (model {name!r})")
    except EngineUnavailable as err:
        say(f"[2/3] WARNING: {err}")
    secure = engine.url.startswith("https://") or _loopback_url(engine.url)
    say(f"      photos and questions go to that server to be answered{'' if secure else ' UNENCRYPTED (http off loopback: use https, or keep it on loopback)'}; "
        f"nothing is kept here beyond what this app keeps")
    return engine


def _loopback_url(url: str) -> bool:
    host = httpx.URL(url).host
    return host in ("localhost", "::1") or host.startswith("127.")
