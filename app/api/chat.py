"""An OpenAI-compatible chat API on the app's own server: GET /v1/models, POST /v1/chat/completions.

Browser users and API callers share one engine and one batch. The protocol is stateless (every
request carries the whole history); the engine matches it against cached sessions by prefix
(`prefix_cache`), so a follow-up prefills only its new tail; `usage.prompt_tokens_details.
cached_tokens` says how much was reused. Images come only inline (`data:image/...;base64,`): the
server never fetches a URL. They go through the app's own photo pipeline, in memory: nothing is
written to disk, and the log records events and timings, never text or pixels.

`ChatAPI` is plain Python (the bench drives it in-process); `mount` puts it on a FastAPI app.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

from fastapi import Request  # at module level: FastAPI reads the routes' annotations by name
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.prompt.conversation import Conversation, ConversationError, ImageInput, Turn
from model.clinical.history import ClinicalHistory, with_history
from model.errors import UserFacingError
from model.serving.sampler import SamplingSettings
from model.images.decode import MAX_BYTES, ImageError, ImageTooLarge
from model.images.intake import Intake, take_photo

from app.errors import api_body, sentence
from app.settings import MAX_PHOTOS

log = logging.getLogger("skingpt.api")

MAX_BODY_BYTES = 40 * 2**20  # the largest photo in base64 (4/3 of its 25 MB) and the text; refused while read
MAX_TEXT_CHARS = 8000  # one message
API_PREFIX = "/v1/"  # where the API lives: the guard takes JSON only there, and errors there are JSON
_DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+);base64,(.*)", re.DOTALL)
_FINISH = {"eos": "stop", "stop": "stop", "cancelled": "stop", "length": "length"}


class APIError(Exception):
    """An error in the API's own format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return api_body(self.message, self.code, self.param, self.kind)


class _ImageURL(BaseModel):
    url: str
    detail: str | None = None


class _Part(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: _ImageURL | None = None


class _Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part] | None = None


class _StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we need not act on (user, metadata, ...)

    model: str
    messages: list[_Message] = Field(min_length=1)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-2**63, lt=2**64)
    stop: str | list[str] | None = None
    n: int | None = None
    prompt_cache_key: str | None = Field(None, min_length=1, max_length=256)  # OpenAI's name: which cache to share
    clinical_history: ClinicalHistory | None = None  # our extension: the history form's fields (README)


@dataclass
class Prepared:
    conversation: Conversation
    settings: dict[str, Any]
    stream: bool
    prompt_images: int
    cache_key: str | None = None
    photo_quality: list[dict[str, Any]] | None = None  # per photo in the request, in order


class ChatAPI:
    """`callers_apart`: the server holds a key per caller, so a caller (its key) is a cache family of
    its own. Otherwise callers cannot be told apart, and a request reuses only what requests with the
    same `prompt_cache_key` left: a caller who does not send one shares nothing, and learns nothing
    from `cached_tokens` or from timing about what others sent."""

    def __init__(self, engine, model_id: str, max_queue: int | None = None, callers_apart: bool = False,
                 photo_room: Callable[[int], bool] = lambda n: True) -> None:
        self.engine, self.model_id = engine, model_id
        self.photo_room = photo_room  # whether the server may hold n more bytes of decoded photos (the page's bound)
        self.max_queue = max_queue if max_queue is not None else 4 * engine.max_batch
        self.callers_apart = callers_apart
        self.created = int(time.time())

    def cache_family(self, caller: str | None, cache_key: str | None) -> str | None:
        """The session-name prefix whose cached prefixes this request may reuse (None: none)."""
        parts = [p for p in (caller if self.callers_apart else None, cache_key) if p is not None]
        if not parts:
            return None
        return "api:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32] + ":"

    # -- GET /v1/models ------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        config = self.engine.config
        return {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created, "owned_by": "local",
            "preset": config.name, "prompt_template": config.prompt_template,
            "max_context": config.generation.max_context}]}

    # -- POST /v1/chat/completions ----------------------------------------------------------------
    def prepare(self, body: Any) -> Prepared:
        """Validate a request body into a conversation and settings, or raise APIError."""
        try:
            request = ChatRequest.model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise APIError(400, f"invalid request: {param}: {first['msg']}", "invalid_value", param) from None
        if request.model != self.model_id:
            raise APIError(404, f"the model {request.model!r} does not exist here; this server has "
                                f"{self.model_id!r} (GET /v1/models)", "model_not_found", "model")
        if request.n not in (None, 1):
            raise APIError(400, "only n=1 is supported: ask again for another answer", "unsupported_value", "n")
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", "invalid_value", "stop")
        conversation, photos = self._conversation(request.messages)
        max_new = request.max_completion_tokens or request.max_tokens
        if max_new is not None and max_new >= self.engine.config.generation.max_context:
            raise APIError(400, f"max_tokens must be below the context of "
                                f"{self.engine.config.generation.max_context}", "invalid_value", "max_tokens")
        sampling = SamplingSettings(max_new_tokens=max_new, temperature=request.temperature, top_p=request.top_p,
                                    seed=request.seed)
        settings: dict[str, Any] = {"stop": tuple(stops), **sampling.overrides()}
        quality = [{**photo.quality.model_dump(include={"ok", "problems"}), "notes": list(photo.notes)}
                   for photo in photos]  # measured when each was taken in
        return Prepared(with_history(conversation, request.clinical_history), settings, request.stream, len(photos),
                        request.prompt_cache_key, quality)

    def _conversation(self, messages: list[_Message]) -> tuple[Conversation, list[Intake]]:
        system = "\n".join(_text(m, i) for i, m in enumerate(messages) if m.role in ("system", "developer"))
        turns: list[list] = []  # [question parts, images, answer or None]
        photos: list[Intake] = []  # every photo as taken in, in the conversation's order
        for i, message in enumerate(m for m in messages if m.role not in ("system", "developer")):
            if message.role == "user":
                if not turns or turns[-1][2] is not None:
                    turns.append([[], [], None])
                text, taken = self._user_content(message, i)
                turns[-1][0].append(text)
                turns[-1][1].extend(ImageInput.of(photo.image) for photo in taken)
                photos.extend(taken)
            else:
                if not turns or turns[-1][2] is not None:
                    raise APIError(400, "an assistant message must follow a user message", "invalid_value",
                                   f"messages[{i}]")
                turns[-1][2] = _text(message, i)
        if not turns or turns[-1][2] is not None:
            raise APIError(400, "the last message must be the user's question", "invalid_value", "messages")
        count = len(photos)
        if count == 0:
            raise APIError(400, "SkinGPT answers about a photo of the skin: add one to a user message as an "
                                "image_url part with a data:image/...;base64 URL", "image_required", "messages")
        if count > MAX_PHOTOS:
            raise APIError(400, f"at most {MAX_PHOTOS} photos per conversation", "too_many_images", "messages")
        if not self.photo_room(sum(photo.pixel_bytes for photo in photos)):
            raise APIError(503, "the server is holding as many photos as it can right now; try again in a few "
                                "minutes, or send smaller photos", "server_busy", kind="server_error",
                           headers={"Retry-After": "30"})
        built = []  # the turns as one tuple: history of any length is one pass
        for n, (parts, images, answer) in enumerate(turns):
            question = " ".join(p for p in parts if p).strip()
            if n == 0 and system:
                question = f"{system}\n\n{question}".strip()
            built.append(Turn(question or "Please describe the skin in this photo.", tuple(images), answer))
        return Conversation(tuple(built)), photos

    def _user_content(self, message: _Message, index: int) -> tuple[str, list[Intake]]:
        if isinstance(message.content, str) or message.content is None:
            return _checked(message.content or "", index), []
        texts, images = [], []
        for j, part in enumerate(message.content):
            where = f"messages[{index}].content[{j}]"
            if part.type == "text":
                texts.append(_checked(part.text or "", index))
            elif part.image_url is None:
                raise APIError(400, "an image_url part needs image_url.url", "invalid_value", where)
            else:
                images.append(self._image(part.image_url.url, where))
        return " ".join(texts), images

    @staticmethod
    def _image(url: str, where: str) -> Intake:
        if url.startswith(("http://", "https://")):
            raise APIError(400, "this server never fetches URLs: send the photo inline as a "
                                "data:image/jpeg;base64,... URL", "image_url_not_allowed", where)
        match = _DATA_URL.fullmatch(url.strip())
        if match is None:
            raise APIError(400, "an image must be a data:image/...;base64,... URL", "invalid_image_url", where)
        if len(match.group(2)) * 3 // 4 > MAX_BYTES:
            raise APIError(413, f"the photo is over {MAX_BYTES // 2**20} MB; please send a smaller one",
                           "image_too_large", where)
        try:
            data = base64.b64decode(match.group(2), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the photo's base64 data is not valid", "invalid_base64", where) from None
        try:
            return take_photo(data, name="The photo")
        except ImageTooLarge as err:
            raise APIError(413, str(err), "image_too_large", where) from None
        except ImageError as err:
            raise APIError(400, str(err), "invalid_image", where) from None

    def start(self, prepared: Prepared, caller: str | None = None):
        """Hand the request to the engine (or refuse it when the queue is full)."""
        if self.engine.scheduler.queued >= self.max_queue:
            raise APIError(503, "the server is busy; try again in a few seconds", "server_busy", kind="server_error",
                           headers={"Retry-After": "5"})
        family = self.cache_family(caller, prepared.cache_key)
        return _run(lambda: self.engine.stream(prepared.conversation, prefix_cache=family, **prepared.settings))

    def complete(self, prepared: Prepared, generation=None) -> dict[str, Any]:
        """A whole (non-streamed) answer."""
        started = time.perf_counter()
        generation = generation or self.start(prepared)
        text = _run(lambda: "".join(generation))
        _log(generation, started)
        if generation.finish_reason == "timeout":
            raise self._timeout()
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_id, "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": text.strip()},
                    "finish_reason": _FINISH.get(generation.finish_reason, "stop")}],
                "usage": _usage(generation), "photo_quality": prepared.photo_quality}

    def chunks(self, prepared: Prepared, generation) -> Iterator[dict[str, Any]]:
        """Chunk objects of a streamed answer; the last carries finish_reason and usage."""
        started = time.perf_counter()
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra) -> dict[str, Any]:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

        yield chunk({"role": "assistant", "content": ""}, photo_quality=prepared.photo_quality)
        first = True
        pieces = iter(generation)
        while (piece := _run(lambda: next(pieces, None))) is not None:
            piece, first = (piece.lstrip() if first else piece), False  # the answer starts after "Assistant:"
            if piece:
                yield chunk({"content": piece})
        _log(generation, started)
        if generation.finish_reason == "timeout":
            raise self._timeout()
        yield chunk({}, _FINISH.get(generation.finish_reason, "stop"), usage=_usage(generation))

    def _timeout(self) -> APIError:
        return APIError(504, f"the answer took longer than this server's limit of "
                             f"{self.engine.request_timeout_s:.0f} s (SKINGPT_REQUEST_TIMEOUT_S); ask for fewer tokens "
                             f"(max_tokens), or try again when the server is less busy", "timeout", kind="server_error")


def _run(call):
    """Engine errors a client should see (context too long, ...) as API errors."""
    try:
        return call()
    except ConversationError as err:
        raise APIError(400, str(err), "context_length_exceeded") from None
    except UserFacingError as err:
        status = err.http_status  # 502: the remote engine (serve --engine-url) failed
        raise APIError(status, str(err), "invalid_request" if status == 400 else "engine_unavailable",
                       kind="invalid_request_error" if status == 400 else "server_error") from None


def _text(message: _Message, index: int) -> str:
    if isinstance(message.content, list):
        if any(p.type != "text" for p in message.content):
            raise APIError(400, f"{message.role} messages take text only", "invalid_value", f"messages[{index}]")
        return _checked(" ".join(p.text or "" for p in message.content), index)
    return _checked(message.content or "", index)


def _checked(text: str, index: int) -> str:
    if len(text) > MAX_TEXT_CHARS:
        raise APIError(413, f"message {index} is {len(text)} characters; the limit is {MAX_TEXT_CHARS}",
                       "message_too_long", f"messages[{index}]")
    return text


def _usage(generation) -> dict[str, Any]:
    stats = generation.stats
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.reused_tokens}}


def _log(generation, started: float) -> None:
    stats = generation.stats
    log.info("api answer prompt=%d reused=%d tokens=%d seconds=%.2f finish=%s", stats.prompt_tokens,
             stats.reused_tokens, stats.new_tokens, time.perf_counter() - started, generation.finish_reason)


# -- HTTP -----------------------------------------------------------------------------------------

def router(api: ChatAPI, keys: list[str]):
    """/v1/models and /v1/chat/completions. `keys`: the bearer keys (none: no key asked; the server is
    then on loopback). The key check is a dependency of every route; every refusal is an APIError,
    turned into the API's error format by `error_response` (installed by the app)."""
    import anyio
    from fastapi import APIRouter, Depends
    from fastapi.responses import StreamingResponse

    def caller(request: Request) -> str | None:
        """The key this request holds (its caller), checked against every key in constant time."""
        if not keys:
            return None
        given = request.headers.get("authorization", "")
        token = (given[7:] if given.lower().startswith("bearer ") else "").encode()
        found = None
        for key in keys:
            if hmac.compare_digest(token, key.encode()):
                found = key
        if found is None:
            raise APIError(401, "a valid API key is required: send Authorization: Bearer KEY", "invalid_api_key",
                           kind="authentication_error")
        return found

    routes = APIRouter(dependencies=[Depends(caller)])

    @routes.get("/v1/models", response_model=ModelList)
    async def models():
        return api.models()

    @routes.post("/v1/chat/completions", response_model=None)
    async def completions(request: Request, key: str | None = Depends(caller)):
        prepared = await anyio.to_thread.run_sync(api.prepare, await _json_body(request))
        generation = await anyio.to_thread.run_sync(api.start, prepared, key)
        if not prepared.stream:
            return await _until_disconnected(request, generation, lambda: api.complete(prepared, generation))
        return StreamingResponse(_sse(api, prepared, generation), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return routes


class _ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    preset: str
    prompt_template: str
    max_context: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[_ModelCard]


def error_response(request, err: Exception):
    """Every error of the API in its own format; anything unexpected as a 500 that names nothing
    (the log names the type, never a stack trace to the client); the web page's own, as plain text."""
    from fastapi.responses import JSONResponse, PlainTextResponse

    from starlette.requests import ClientDisconnect

    if isinstance(err, APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
    if isinstance(err, ClientDisconnect):  # the client left mid-body, or the guard cut a body over its limit
        log.info("request ended before its body was read")
        return PlainTextResponse(sentence("the request ended before its body did"), status_code=400)
    if not request.url.path.startswith(API_PREFIX):
        log.error("request failed reason=%s", type(err).__name__)
        return PlainTextResponse(sentence("something went wrong on the server; please try again"), status_code=500)
    log.error("api request failed reason=%s", type(err).__name__, exc_info=err)
    return error_response(request, APIError(500, "something went wrong on the server; please try again",
                                            "internal_error", kind="server_error"))


async def _json_body(request: Request) -> Any:
    """The body as JSON (its size is bounded while it is read, in front of every route)."""
    data = await request.body()
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        raise APIError(400, "the body is not valid JSON", "invalid_json") from None


async def _until_disconnected(request: Request, generation, complete):
    """Run a whole answer; when the client goes away first, stop it at the next step."""
    import anyio

    outcome: list = []

    async def answer(tasks) -> None:
        try:
            outcome.append(await anyio.to_thread.run_sync(complete))
        except BaseException as err:  # noqa: BLE001 - raised again below, outside the task group
            outcome.append(err)
        tasks.cancel_scope.cancel()

    async def watch() -> None:
        while not await request.is_disconnected():
            await anyio.sleep(0.25)
        generation.close()
        log.info("api request closed by the client after tokens=%d", generation.produced)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(answer, tasks)
        tasks.start_soon(watch)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


async def _sse(api: ChatAPI, prepared: Prepared, generation):
    import anyio

    chunks, done = api.chunks(prepared, generation), False
    try:
        while (chunk := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
        done = True
    except APIError as err:
        yield f"data: {json.dumps(err.body())}\n\n"
    finally:
        if not done:
            generation.close()  # a client that went away frees its batch slot at the next step
            log.info("api stream closed by the client after tokens=%d", generation.produced)
