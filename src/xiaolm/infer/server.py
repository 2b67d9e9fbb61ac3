"""OpenAI-compatible HTTP API over one model: chat and text completions, streamed (SSE) or not.

Requests are checked here (every refusal is a 4xx in OpenAI's error shape), turned into scheduler jobs (one per
choice), and their events turned back into OpenAI JSON. The model runs in the scheduler only, by default in a
process of its own (infer/engine_process.py), so the event loop stays free to accept, refuse and stream, and the
two do not share one GIL.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from xiaolm.chat_format import normalize_chat
from xiaolm.errors import XiaolmError
from xiaolm.infer.engine_process import EngineProcess
from xiaolm.infer.generate import Engine, Event, GenerationConfig, chat_stop_ids
from xiaolm.infer.scheduler import Job, Scheduler
from xiaolm.model.registry import arch_of

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class Limits:
    """What one server accepts; a request beyond them is refused with a 4xx (429 when busy)."""

    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int = 0  # 0 = the context minus one (room for one new token)
    max_tokens: int = 0  # a larger `max_tokens` is refused; 0 = the context. Smaller ones are capped to fit.
    max_running: int = 16  # sequences decoding together (engine slots); a request with n choices takes n
    max_queue: int = 64  # sequences waiting for a slot; beyond it, 429 with Retry-After
    max_n: int = 8
    max_stop: int = 4


class ApiError(Exception):
    """A refusal: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        """OpenAI's error JSON."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default: Any, lo: float, hi: float, integer: bool = False) -> Any:
    """body[name] checked to be a number (an integer if asked) in [lo, hi]; default when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, not {value!r}", param=name)
    if not lo <= value <= hi:
        raise ApiError(400, f"'{name}'={value} is out of range [{lo}, {hi}]", param=name)
    return value


def _stops(body: dict, limit: int) -> list[str]:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > limit:
        raise ApiError(400, f"'stop' must be a string or a list of at most {limit} strings", param="stop")
    return [s for s in stop if s]


def parse_messages(messages: Any) -> list[dict]:
    """OpenAI chat messages → [{role, content}]: optional system first, then user/assistant turns ending in user.

    Text content parts are joined; then the chat format's own check applies (chat_format.normalize_chat): roles,
    string content, and no ChatML special token inside a message, so no message can open a turn of its own.
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    joined = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            m = {**m, "content": "".join(p["text"] for p in content)}
        joined.append(m)
    try:
        out = normalize_chat({"messages": joined})
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None
    turns = out[1:] if out[0]["role"] == "system" else out
    expected = ["user", "assistant"] * len(turns)
    if [m["role"] for m in turns] != expected[:len(turns)] or not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "roles out of order: an optional system message, then user and assistant turns "
                            "alternating, starting and ending with user", param="messages")
    return out


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(model: nn.Module, tokenizer: PreTrainedTokenizerBase, name: str, api_key: str | None = None,
               limits: Limits | None = None, compile: bool = False, engine_process: bool | None = None) -> FastAPI:
    """The FastAPI app serving `model` under the model id `name`; the scheduler runs while the app lives, in a
    process of its own unless `engine_process` is False (default: its own process except on MPS, whose tensors
    cannot be shared between processes)."""
    limits = limits or Limits()
    ctx = model.cfg.max_seq_len
    # an encoder-decoder model reads the prompt in its encoder: the reply has the decoder's context to itself
    encoder_decoder = arch_of(model).encoder_decoder
    max_prompt = min(limits.max_prompt_tokens or ctx - 1, ctx - 1)
    max_tokens_limit = limits.max_tokens or ctx
    if engine_process is None:
        engine_process = next(model.parameters()).device.type != "mps"
    scheduler = (EngineProcess(model, tokenizer, limits.max_running, limits.max_queue, compile=compile)
                 if engine_process else
                 Scheduler(Engine(model, limits.max_running, tokenizer=tokenizer, compile=compile), limits.max_queue))
    chat_stops, text_stops = chat_stop_ids(tokenizer), [model.cfg.eos_token_id]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.close()

    app = FastAPI(title="xiaolm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}", "server_error").body(), 500)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           "authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length", "")
        too_big = ApiError(413, f"request body over {limits.max_body_bytes} bytes", code="request_too_large")
        if length.isdigit() and int(length) > limits.max_body_bytes:
            raise too_big
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise too_big
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        if body.get("model") != name:
            if not isinstance(body.get("model"), str):
                raise ApiError(400, "'model' must be a string (see GET /v1/models)", param="model")
            raise ApiError(404, f"the model '{body['model']}' does not exist; this server has '{name}'",
                           param="model", code="model_not_found")
        return body

    def settings(body: dict, prompt: list[int], stop_ids: list[int]) -> tuple[GenerationConfig, int, list[str]]:
        """(settings for every choice, n, warnings) from the request's fields."""
        if len(prompt) > max_prompt:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; this model takes at most {max_prompt} "
                                f"(its context is {ctx} tokens)", param="messages", code="context_length_exceeded")
        room, warnings = ctx - 1 if encoder_decoder else ctx - len(prompt), []
        max_tokens = _number(body, "max_completion_tokens", None, 1, max_tokens_limit, integer=True)
        max_tokens = _number(body, "max_tokens", max_tokens, 1, max_tokens_limit, integer=True)
        if max_tokens is not None and max_tokens > room:
            warnings.append(f"max_tokens={max_tokens} capped to {room}: " + (
                f"the decoder's context is {ctx} tokens, its start token included" if encoder_decoder else
                f"the prompt's {len(prompt)} tokens leave {room} of the {ctx}-token context"))
        n = _number(body, "n", 1, 1, min(limits.max_n, limits.max_running), integer=True)
        if not isinstance(body.get("stream", False), bool):
            raise ApiError(400, "'stream' must be true or false", param="stream")
        cfg = GenerationConfig(
            max_new_tokens=min(max_tokens or room, room), temperature=_number(body, "temperature", 1.0, 0, 2),
            top_p=float(_number(body, "top_p", 1.0, 0, 1)), top_k=_number(body, "top_k", 0, 0, 1 << 30, True),
            min_p=float(_number(body, "min_p", 0.0, 0, 1)), stop_ids=stop_ids,
            stop_strings=_stops(body, limits.max_stop),
            repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0.01, 100)),
            seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True))
        if cfg.top_p <= 0:
            raise ApiError(400, "'top_p' must be above 0", param="top_p")
        return cfg, n, warnings

    async def complete(request: Request, body: dict, prompt: list[int], stop_ids: list[int], chat: bool) -> Any:
        cfg, n, warnings = settings(body, prompt, stop_ids)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def deliver_to(index: int):
            def deliver(event: Event | Exception) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))
                except RuntimeError:  # the event loop is gone (shutdown)
                    pass
            return deliver

        seeds = [None if cfg.seed is None else cfg.seed + i for i in range(n)]
        jobs = [Job(prompt, replace(cfg, seed=seeds[i]), deliver_to(i)) for i in range(n)]
        try:
            accepted = scheduler.submit(jobs)
        except XiaolmError as e:  # the engine process is gone: this server cannot answer any more
            raise ApiError(503, str(e), "server_error", code="engine_stopped") from e
        if not accepted:
            stats = scheduler.stats()
            raise ApiError(429, f"server busy: {stats['running']} sequences running, "
                                f"{stats['waiting']} waiting; retry shortly", "rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": kind,
                "created": int(time.time()), "model": name}
        headers = {"X-Max-Tokens": str(cfg.max_new_tokens)}
        counts = [0] * n

        async def results():
            """(choice index, event) until every choice has finished; cancels the jobs if abandoned."""
            left = n
            try:
                while left:
                    index, event = await events.get()
                    if isinstance(event, Exception):
                        raise ApiError(500, f"generation failed: {event}", "server_error")
                    counts[index] += event.token is not None
                    left -= event.finish is not None
                    yield index, event
            finally:
                for job in jobs:
                    scheduler.cancel(job)

        def usage() -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": sum(counts),
                    "total_tokens": len(prompt) + sum(counts)}

        if not body.get("stream"):
            texts, finish = [""] * n, [None] * n

            async def collect() -> None:
                async for index, event in results():
                    texts[index] += event.text
                    finish[index] = event.finish or finish[index]

            task = asyncio.ensure_future(collect())
            while not (await asyncio.wait({task}, timeout=0.5))[0]:
                if await request.is_disconnected():  # nobody to answer: free the slots now
                    task.cancel()
                    return JSONResponse(ApiError(499, "client closed the request").body(), 499)
            task.result()
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                            "finish_reason": finish[i], "logprobs": None} for i in range(n)]
            else:
                choices = [{"index": i, "text": texts[i], "finish_reason": finish[i], "logprobs": None}
                           for i in range(n)]
            extra = {"warnings": warnings} if warnings else {}
            return JSONResponse({**head, "choices": choices, "usage": usage(), **extra}, headers=headers)

        include_usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")
        head["object"] = f"{kind}.chunk" if chat else kind

        def chunk(index: int, text: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
                choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
            extra = {"usage": None} if include_usage else {}
            return _sse({**head, "choices": [choice], **extra})

        async def stream():
            try:
                if chat:
                    for i in range(n):
                        yield chunk(i, None, role=True)
                async for index, event in results():
                    if event.text:
                        yield chunk(index, event.text)
                    if event.finish:
                        yield chunk(index, None, event.finish)
            except ApiError as e:
                yield _sse(e.body())
            if include_usage:
                yield _sse({**head, "choices": [], "usage": usage()})
            yield _sse("[DONE]")

        headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    def encode_chat(messages: list[dict]) -> list[int]:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            from xiaolm.chat_format import render_chat

            text = render_chat(messages, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request) -> Any:
        body = await read_json(request)
        prompt = encode_chat(parse_messages(body.get("messages")))
        return await complete(request, body, prompt, chat_stops, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request) -> Any:
        body = await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return await complete(request, body, ids, text_stops, chat=False)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "xiaolm",
                                            "context_length": ctx}]}

    @app.get("/health")
    async def health() -> dict:
        stats = scheduler.stats()
        return {"status": "ok", "model": name, **{k: stats[k] for k in (
            "running", "waiting", "decode_steps", "prompt_tokens_prefilled", "prompt_tokens_reused")}}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("xiaolm.infer").joinpath("static/chat.html").read_text(encoding="utf-8")

    return app
