"""serve.py's run: load the checkpoint, start the decoding loop, serve HTTP with uvicorn until
SIGTERM or Ctrl-C. SIGTERM drains: new requests get 503, those in flight finish, the process
exits 0."""

import logging
import os
import signal
import sys
import threading
import time

import torch
import uvicorn

from engines.serve_api import Settings, create_app
from engines.serve_engine import ServingEngine
from engines.serve_metrics import ServerMetrics
from engines.serve_tasks import initial_tasks
from models.checkpoint import load_checkpoint
from models.vlm import backbone_fingerprint
from utils.errors import VLMError

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_settings(args):
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise VLMError(f"--device {args.device}: CUDA is not available on this machine")
    for flag in ("max_batch_size", "max_queue", "prefill_tokens", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise VLMError(f"--{flag} must be at least 1")
    if args.max_cache_tokens is not None and args.max_cache_tokens < 2:
        raise VLMError("--max_cache_tokens must be at least 2")
    if not args.request_timeout > 0:
        raise VLMError("--request_timeout must be positive")
    if not 0 <= args.port < 65536:
        raise VLMError(f"--port must be between 0 and 65535, got {args.port}")
    if args.admin_token and not args.admin_root:
        raise VLMError(
            "--admin_token needs --admin_root: the folder whose checkpoints the admin API may load"
        )
    if args.admin_root and not os.path.isdir(args.admin_root):
        raise VLMError(f"--admin_root {args.admin_root}: no such folder")


def build_engine(args):
    """(engine, metrics, settings) for the flags; the model is loaded and the loop not started."""
    model, tokenizer, config = load_checkpoint(args.model_checkpoint, args.device)
    model = model.to(DTYPES[args.dtype]).eval()
    tasks = initial_tasks(model, config, args)
    limit = args.max_cache_tokens or args.max_batch_size * model.config.n_positions
    metrics = ServerMetrics(limit)
    static = None if args.batching == "continuous" else (args.max_batch_size, args.static_wait_ms / 1000)
    engine = ServingEngine(
        model,
        tokenizer,
        tasks,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        prefill_tokens=args.prefill_tokens,
        max_cache_tokens=limit,
        metrics=metrics,
        static_batching=static,
    )
    settings = Settings(
        api_key=args.api_key,
        admin_token=args.admin_token,
        admin_root=args.admin_root,
        max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout,
        fingerprint=backbone_fingerprint(model.gpt2) if args.admin_token else "",
    )
    return engine, metrics, settings


def cache_megabytes(model, positions):
    c = model.config
    per_position = 2 * c.n_layer * c.n_embd * next(model.parameters()).element_size()
    return positions * per_position / 2**20


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but SIGTERM first drains: the engine refuses new prompts (the API answers
    503), the ones queued and running finish, then the server stops and the process exits 0."""

    def __init__(self, config, engine, ready_line):
        super().__init__(config)
        self.engine, self.ready_line = engine, ready_line

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started or self.servers:
            port = self.servers[0].sockets[0].getsockname()[1] if self.servers else self.config.port
            print(self.ready_line(port), flush=True)

    def handle_exit(self, sig, frame):
        if sig == signal.SIGTERM and not self.engine.draining:
            self.engine.draining = True
            threading.Thread(target=self._exit_when_drained, daemon=True).start()
            return
        super().handle_exit(sig, frame)

    def _exit_when_drained(self):
        while not self.engine.idle():
            time.sleep(0.05)
        time.sleep(0.2)  # let the last responses leave
        self.should_exit = True  # not via handle_exit: uvicorn would re-raise SIGTERM after shutdown


def serve(args):
    check_settings(args)
    torch.set_grad_enabled(False)
    engine, _, settings = build_engine(args)
    app = create_app(engine, engine.metrics, settings)
    model = engine.model
    names = ", ".join(f"{n} ({'+'.join(s.methods) or s.task.kind})" for n, s in engine.tasks.items())

    def ready_line(port):
        return (
            f"vlm serving {len(engine.tasks)} models at http://{args.host}:{port}/v1: {names}; "
            f"{args.batching} batching of at most {args.max_batch_size} rows, queue {args.max_queue}, "
            f"key/value cache at most {engine.max_cache_tokens:,} positions "
            f"({cache_megabytes(model, engine.max_cache_tokens):,.0f} MB)"
        )

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=args.access_log,
        timeout_graceful_shutdown=args.request_timeout,
    )
    server = DrainingServer(config, engine, ready_line)
    engine.start()
    try:
        server.run()
    finally:
        engine.stop()
    if not server.started:
        print(
            f"error: cannot listen on {args.host}:{args.port} (in use, or not an address of this machine)",
            file=sys.stderr,
        )
        sys.exit(1)
