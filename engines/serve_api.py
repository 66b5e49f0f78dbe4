"""The HTTP face of the server: OpenAI's API on FastAPI, over one ServingEngine.

    GET  /health                 200 once the model is loaded (503 while draining)
    GET  /v1/models              every task: its kind and methods
    POST /v1/completions         model = a task; prompt = its input (text, or a JSON object as text)
    POST /v1/chat/completions    tasks whose input is a conversation (dialogue, qa, one-field user tasks)
    GET  /metrics                Prometheus
    POST /admin/tasks            {"checkpoint": PATH}: add or replace tasks (Bearer --admin_token)
    DELETE /admin/tasks/NAME     remove one

Errors are OpenAI's error JSON, naming the field at fault in `param`.
"""

import asyncio
import hmac
import json
import math
import random
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from engines.generate import DecodingOptions
from engines.serve_engine import Sequence, ServingError
from engines.serve_tasks import attach_loaded, build_prompt, check_under_root, load_tasks_from_checkpoint
from utils.errors import VLMError

MAX_STOP = 4
UNSUPPORTED = {  # fields whose non-default values we cannot honour: refused, never silently ignored
    "logprobs": (None, 0, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None,),
    "tools": (None,),
    "functions": (None,),
}


@dataclass
class Settings:
    api_key: str = None
    admin_token: str = None
    admin_root: str = None
    max_body_bytes: int = 1 << 20
    request_timeout: float = 600.0
    fingerprint: str = ""


def error_response(status, message, kind="invalid_request_error", param=None, headers=None):
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": None}},
        status_code=status,
        headers=headers,
    )


def from_error(error):
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return error_response(error.status, error.message, error.kind, error.param, headers)


# --- request fields -------------------------------------------------------------------------------
def _bad(param, message):
    return ServingError(400, f"{param}: {message}", param=param)


def _int(body, key, default, low, high=None):
    value = body.get(key, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        span = f"at least {low}" if high is None else f"between {low} and {high}"
        raise _bad(key, f"must be an integer {span}, got {json.dumps(value)[:40]}")
    return value


def _number(body, key, default, check, requirement):
    value = body.get(key, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not check(value)
    ):
        raise _bad(key, f"must be {requirement}, got {json.dumps(value)[:40]}")
    return float(value)


def parse_sampling(body, n_positions, token_key="max_tokens"):
    """DecodingOptions from OpenAI's fields; omitted ones take evaluate.py's defaults (150 tokens,
    temperature 0.7, top_p 0.9, top_k 0, min 1 token), an omitted seed a random one."""
    for key, allowed in UNSUPPORTED.items():
        if body.get(key) not in allowed and not (key == "logit_bias" and body.get(key) == {}):
            raise _bad(key, "is not supported by this server")
    if _int(body, "n", 1, 1) != 1:
        raise _bad("n", "only n = 1 is supported (send the prompt again for more samples)")
    key = token_key if token_key in body else "max_tokens"
    max_tokens = _int(body, key, 150, 1, n_positions)
    temperature = _number(body, "temperature", 0.7, lambda v: v >= 0, "a number >= 0 (0: greedy)")
    top_p = _number(body, "top_p", 0.9, lambda v: 0 < v <= 1, "in (0, 1]")
    top_k = _int(body, "top_k", 0, 0)
    min_tokens = _int(body, "min_tokens", 1, 0, max_tokens)
    seed = body.get("seed")
    if seed is None:
        seed = random.randrange(1 << 62)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < (1 << 62):
        raise _bad("seed", f"must be an integer between 0 and 2**62, got {json.dumps(seed)[:40]}")
    return DecodingOptions(
        max_length=max_tokens,
        no_sample=temperature == 0,
        temperature=temperature or 1.0,
        top_k=top_k,
        top_p=top_p,
        min_length=min_tokens,
        seed=seed,
    )


def parse_stop(body):
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise _bad("stop", f"must be a non-empty string or a list of at most {MAX_STOP} of them")
    return tuple(stops)


def parse_stream(body):
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options", "must be an object")
    return stream, bool(options.get("include_usage", False))


def completion_items(prompt):
    """[(item, where)]: evaluate.py --input's forms (text, or a JSON object given as text)."""
    if isinstance(prompt, (str, dict)):
        prompts, single = [prompt], True
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, dict)) for p in prompt):
        prompts, single = prompt, False
    else:
        raise _bad(
            "prompt",
            "must be text, a JSON object of the task's fields, or a non-empty list of them "
            "(token ids are not accepted)",
        )
    items = []
    for i, p in enumerate(prompts):
        where = "prompt" if single else f"prompt[{i}]"
        if isinstance(p, str) and p.lstrip().startswith("{"):
            try:
                parsed = json.loads(p)
            except json.JSONDecodeError:
                parsed = p  # text that merely starts with a brace
            p = parsed if isinstance(parsed, dict) else p
        items.append((p, where))
    return items


def chat_turns(messages):
    """[(role, text)] of OpenAI chat messages (content as text or as text parts)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of messages")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in (
            "system",
            "developer",
            "user",
            "assistant",
        ):
            raise _bad(where, "needs a role of system, user or assistant")
        content = message.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                for part in content
            ):
                raise _bad(f"{where}.content", "only text parts are supported")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise _bad(f"{where}.content", "must be text")
        role = "system" if message["role"] == "developer" else message["role"]
        turns.append((role, content))
    return turns


# --- the app --------------------------------------------------------------------------------------
def create_app(engine, metrics, settings):
    app = FastAPI(title="vlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.open_requests = 0

    app.add_middleware(Guard, engine=engine, settings=settings)

    async def read_body(request):
        size, chunks = 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise ServingError(413, f"the request body is larger than {settings.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ServingError(400, f"the request body is not valid JSON ({error})") from None
        if not isinstance(body, dict):
            raise ServingError(400, "the request body must be a JSON object")
        return body

    def served(body):
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise _bad("model", "name the task to run (GET /v1/models lists them)")
        task = engine.tasks.get(name)
        if task is None:
            raise ServingError(
                404, f"model: no task {name!r} here (has: {', '.join(engine.tasks)})", param="model"
            )
        return task

    @app.exception_handler(ServingError)
    async def serving_error(request, error):
        return from_error(error)

    @app.get("/health")
    async def health():
        waiting, running, _, _ = engine.counts()
        status = "draining" if engine.draining else "ok"
        return JSONResponse(
            {"status": status, "tasks": len(engine.tasks), "running": running, "waiting": waiting},
            status_code=503 if engine.draining else 200,
        )

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "vlm",
                    "kind": s.task.kind,
                    "methods": list(s.methods),
                }
                for name, s in engine.tasks.items()
            ],
        }

    async def run_request(request, body, items, chat):
        task = served(body)
        options = parse_sampling(body, engine.n_positions, "max_completion_tokens" if chat else "max_tokens")
        stop, (stream, include_usage) = parse_stop(body), parse_stream(body)
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()

        def on_event(seq, kind):  # the decoding loop's thread: hand over the values as they are now
            loop.call_soon_threadsafe(events.put_nowait, (seq.index, kind, seq.delta))

        deadline = time.monotonic() + settings.request_timeout
        seqs = []
        for index, (item, where) in enumerate(items):
            try:
                prompt = build_prompt(task, item, engine.tokenizer, engine.n_positions, where)
            except VLMError as error:
                raise ServingError(400, str(error), param=where.split("[")[0]) from None
            seqs.append(
                Sequence(
                    task,
                    prompt,
                    options,
                    index=index,
                    stop=stop,
                    stream=stream,
                    on_event=on_event,
                    item=item,
                    where=where,
                    deadline=deadline,
                )
            )
        engine.submit(seqs)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        reply = Reply(ident, task.name, chat, seqs)
        if stream:
            return StreamingResponse(
                stream_events(reply, events, include_usage), media_type="text/event-stream"
            )
        finished = 0
        while finished < len(seqs):
            try:
                _, kind, _ = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(seqs)
                    metrics.request(task.name, 499)
                    return Response(status_code=499)
                continue
            finished += kind == "done"
        failed = [s.error for s in seqs if s.error is not None]
        if failed:
            metrics.request(task.name, failed[0].status)
            return from_error(failed[0])
        metrics.request(task.name, 200)
        return reply.whole()

    async def stream_events(reply, events, include_usage):
        finished = 0
        try:
            if reply.chat:
                yield sse(reply.chunk(0, {"role": "assistant", "content": ""}, None))
            while finished < len(reply.seqs):
                index, kind, delta = await events.get()
                seq = reply.seqs[index]
                if kind == "token":
                    yield sse(reply.chunk(index, delta, None))
                    continue
                finished += 1
                if seq.error is not None:
                    metrics.request(reply.model, seq.error.status)
                    yield sse(
                        {
                            "error": {
                                "message": seq.error.message,
                                "type": seq.error.kind,
                                "param": seq.error.param,
                                "code": None,
                            }
                        }
                    )
                    continue
                if delta:
                    yield sse(reply.chunk(index, delta, None))
                yield sse(reply.chunk(index, "" if not reply.chat else {}, seq.finish_reason))
            if all(s.error is None for s in reply.seqs):
                metrics.request(reply.model, 200)
            if include_usage:
                yield sse(dict(reply.head("chunk"), choices=[], usage=reply.usage()))
            yield "data: [DONE]\n\n"
        finally:
            if finished < len(reply.seqs):  # the client left: free its rows at the next step
                engine.cancel(reply.seqs)
                metrics.request(reply.model, 499)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = None
        try:
            body = await read_body(request)
            return await run_request(request, body, completion_items(body.get("prompt")), chat=False)
        except ServingError as error:
            metrics.request(body_model(body), error.status)
            return from_error(error)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = None
        try:
            body = await read_body(request)
            task = served(body)
            turns = chat_turns(body.get("messages"))
            try:
                item = task.task.chat_input(turns, "messages")
            except VLMError as error:
                raise ServingError(400, str(error), param="messages") from None
            return await run_request(request, body, [(item, "messages")], chat=True)
        except ServingError as error:
            metrics.request(body_model(body), error.status)
            return from_error(error)

    # --- admin ------------------------------------------------------------------------------------
    def check_admin(request):
        if not settings.admin_token:
            raise ServingError(
                403, "the admin API is off: start serve.py with --admin_token", "permission_error"
            )
        if not _bearer_matches(request.headers, settings.admin_token):
            raise ServingError(
                401, "invalid or missing admin token (Authorization: Bearer TOKEN)", "authentication_error"
            )

    @app.post("/admin/tasks")
    async def add_tasks(request: Request):
        check_admin(request)
        body = await read_body(request)
        try:
            path = check_under_root(body.get("checkpoint"), settings.admin_root)
        except PermissionError as error:
            raise ServingError(403, str(error), "permission_error", "checkpoint") from None
        except VLMError as error:
            raise ServingError(400, str(error), param="checkpoint") from None
        try:
            loaded = await run_in_threadpool(
                load_tasks_from_checkpoint, engine.model, settings.fingerprint, path
            )
        except VLMError as error:
            raise ServingError(400, str(error), param="checkpoint") from None
        names = [item.task.name for item in loaded]

        def apply(engine):
            tasks = dict(engine.tasks)
            replaced = []
            for item in loaded:
                old = tasks.get(item.task.name)
                if old is not None and item.task.name in engine.model.tasks:
                    engine.model.remove_task(item.task.name)
                replaced.append(old is not None)
                tasks[item.task.name] = attach_loaded(engine.model, item, old.version + 1 if old else 0)
            engine.tasks = tasks
            return [describe(tasks[n], r) for n, r in zip(names, replaced)]

        return {"tasks": await applied(engine.change(apply, names))}

    @app.delete("/admin/tasks/{name}")
    async def remove_task(name: str, request: Request):
        check_admin(request)
        if name not in engine.tasks:
            raise ServingError(404, f"no task {name!r} here (has: {', '.join(engine.tasks)})", param="name")
        if engine.tasks[name].task.kind == "text":
            raise ServingError(400, f"{name} is the backbone itself; it cannot be removed", param="name")

        def apply(engine):
            tasks = dict(engine.tasks)
            tasks.pop(name, None)
            if name in engine.model.tasks:
                engine.model.remove_task(name)
            engine.tasks = tasks
            return {"deleted": name}

        return await applied(engine.change(apply, [name]))

    async def applied(future):
        """The result of a change the decoding loop applies (once the task's running rows are done)."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=settings.request_timeout)
        except asyncio.TimeoutError:
            raise ServingError(
                504,
                "the change waited longer than --request_timeout for the task's running requests",
                "timeout",
            ) from None
        except VLMError as error:
            raise ServingError(400, str(error), param="checkpoint") from None

    return app


class Guard:
    """Plain ASGI middleware (Starlette's BaseHTTPMiddleware would hide a client's disconnect from
    the routes): 503 while draining, 413 for a declared body over the limit, 401 without the API key."""

    def __init__(self, app, engine, settings):
        self.app, self.engine, self.settings = app, engine, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        refusal = None
        if self.engine.draining and path not in ("/health", "/metrics"):
            refusal = error_response(503, "the server is shutting down", "server_error")
        elif length is not None and (not length.isdigit() or int(length) > self.settings.max_body_bytes):
            refusal = error_response(
                413, f"the request body is larger than {self.settings.max_body_bytes} bytes"
            )
        elif (
            path.startswith("/v1/")
            and self.settings.api_key
            and not _bearer_matches(headers, self.settings.api_key)
        ):
            refusal = error_response(
                401, "invalid or missing API key (Authorization: Bearer KEY)", "authentication_error"
            )
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)


def describe(served, replaced):
    return {
        "id": served.name,
        "kind": served.task.kind,
        "methods": list(served.methods),
        "replaced": replaced,
    }


def body_model(body):
    """The task a request body names, for the metrics' label ("" when it names none)."""
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else ""


def _bearer_matches(headers, secret):
    """headers: a request's headers (a mapping with lower-case names)."""
    header = headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), secret.encode())


def sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Reply:
    """OpenAI's response and chunk objects of one request."""

    def __init__(self, ident, model, chat, seqs):
        self.ident, self.model, self.chat, self.seqs = ident, model, chat, seqs
        self.created = int(time.time())

    def head(self, kind):
        obj = ("chat.completion" if self.chat else "text_completion") + (
            ".chunk" if kind == "chunk" and self.chat else ""
        )
        return {"id": self.ident, "object": obj, "created": self.created, "model": self.model}

    def usage(self):
        prompt = sum(s.prompt_tokens for s in self.seqs)
        completion = sum(len(s.ids) for s in self.seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunk(self, index, delta, finish_reason):
        if self.chat:
            content = delta if isinstance(delta, dict) else {"content": delta}
            choice = {"index": index, "delta": content, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": delta, "finish_reason": finish_reason, "logprobs": None}
        return dict(self.head("chunk"), choices=[choice])

    def whole(self):
        if self.chat:
            choices = [
                {
                    "index": s.index,
                    "message": {"role": "assistant", "content": s.text},
                    "finish_reason": s.finish_reason,
                }
                for s in self.seqs
            ]
        else:
            choices = [
                {"index": s.index, "text": s.text, "finish_reason": s.finish_reason, "logprobs": None}
                for s in self.seqs
            ]
        return dict(self.head("whole"), choices=choices, usage=self.usage())
