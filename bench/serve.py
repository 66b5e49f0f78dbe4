"""Serving bench: serve.py under open-loop Poisson load, continuous batching against static
batching and one request at a time, on the same request trace; plain requests against HF
transformers' own continuous batching; and the decoding step against its matrix products alone.

    python bench/serve.py                                  # the stand-in and GPT-2 small's shape
    python bench/serve.py --backbones tiny --requests 12   # a 2-layer model: checks the bench itself

The trace mixes four tasks of four methods, from the sample data: nlg (adapter), mt (LoRA),
dialogue (prefix tuning) and the sentiment user task (p-tuning), every request greedy with
--max_tokens new tokens at most. Task modules hold random weights: speed does not depend on what
they learned. Writes bench/serve_results.{json,md} and bench/serve_throughput_latency.png.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from engines.specs import builtin_spec, task_spec  # noqa: E402
from models.checkpoint import save_checkpoint  # noqa: E402
from models.vlm import VersatileLM  # noqa: E402
from tasks.task_file import load_task_file, user_task_methods  # noqa: E402
from utils.data import load_tokenizer  # noqa: E402

SAMPLES = os.path.join(REPO, "data", "samples")
TASK_FILE = os.path.join(REPO, "data", "tasks", "nemo_article.json")
SHAPES = {
    "gpt2-small-shape": dict(n_layer=12, n_embd=768, n_head=12),
    "tiny": dict(n_layer=2, n_embd=64, n_head=4),
}
METHODS = {"nlg": {"adapter": {}}, "mt": {"lora": {}}, "dialogue": {"prefix": {}}}


# --- the model and the trace -------------------------------------------------------------------------
def backbone_folder(name, root):
    if name == "stand-in":
        return os.path.join(REPO, "data", "gpt2-stand-in")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = os.path.join(root, name)
    GPT2LMHeadModel(GPT2Config(**SHAPES[name])).save_pretrained(path)
    return path


def build_vlm(base, root):
    """A combined VLM of four tasks, four methods (random, perturbed weights)."""
    tokenizer = load_tokenizer()
    sentiment = load_task_file(TASK_FILE)["sentiment"]
    from models.methods import method_class

    specs = [
        builtin_spec(name, {m: method_class(m).resolve(o) for m, o in methods.items()})
        for name, methods in METHODS.items()
    ]
    methods = {m: method_class(m).resolve(o) for m, o in user_task_methods(sentiment).items()}
    specs.append(task_spec(sentiment, methods))
    model = VersatileLM.from_pretrained(base, specs).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.tasks.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    model.export_methods()
    path = os.path.join(root, "vlm")
    save_checkpoint(
        model,
        tokenizer,
        path,
        "adapter",
        list(model.tasks),
        base,
        task_meta={"sentiment": sentiment.checkpoint_meta()},
    )
    return path


def trace_inputs():
    """[(task, prompt)] round-robin over the four tasks' sample inputs."""
    with open(os.path.join(SAMPLES, "nlg.json"), encoding="utf-8") as f:
        nlg = [", ".join(f"{k}[{v}]" for k, v in r["src"].items()) for r in json.load(f)["test"]]
    with open(os.path.join(SAMPLES, "mt.json"), encoding="utf-8") as f:
        mt = [r["src"] for r in json.load(f)["test"]]
    with open(os.path.join(SAMPLES, "dialogue.json"), encoding="utf-8") as f:
        dialogue = [
            json.dumps({"personality": r["personality"], "history": u["history"]})
            for r in json.load(f)["valid"]
            for u in r["utterances"]
        ]
    with open(os.path.join(SAMPLES, "sentiment", "test.jsonl"), encoding="utf-8") as f:
        sentiment = [json.loads(line)["sentence"] for line in f if line.strip()]
    pools = [("nlg", nlg), ("mt", mt), ("dialogue", dialogue), ("sentiment", sentiment)]
    n = min(len(p) for _, p in pools)
    return [(task, pool[i]) for i in range(n) for task, pool in pools]


def plain_inputs():
    with open(os.path.join(SAMPLES, "nlg.json"), encoding="utf-8") as f:
        return [r["tgt"] for r in json.load(f)["test"]]


# --- a server and its load ---------------------------------------------------------------------------
class Server:
    """serve.py as a process on 127.0.0.1 and a free port (--port 0): its URL from the ready line.
    env: extra variables; log: a file for its stderr."""

    def __init__(self, checkpoint, *flags, env=None, log=None, ready_timeout=300):
        env = dict(os.environ, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", **(env or {}))
        command = [
            sys.executable,
            os.path.join(REPO, "serve.py"),
            "--model_checkpoint",
            checkpoint,
            "--port",
            "0",
            "--device",
            "cpu",
            *flags,
        ]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=open(log, "w") if log else None,
            text=True,
            env=env,
            cwd=REPO,
        )
        line = []  # read in a thread: a server that never gets ready must not hang the caller
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=ready_timeout)
        if not line or "serving" not in line[0]:
            self.proc.kill()
            raise RuntimeError(f"serve.py did not start: {line}")
        self.url = line[0].split(" at ")[1].split()[0].rstrip(":").removesuffix("/v1")

    def close(self):
        """SIGTERM: the server drains and exits."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


async def one_request(client, url, task, prompt, max_tokens, start_at, t0):
    """One streamed request: time to its first chunk, to its end, and its tokens."""
    await asyncio.sleep(max(0.0, start_at - (time.monotonic() - t0)))
    sent = time.monotonic()
    first, tokens = None, 0
    body = {
        "model": task,
        "prompt": prompt,
        "temperature": 0,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"error: {task} request failed: {response.status_code} {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and first is None:
                first = time.monotonic()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    end = time.monotonic()
    return {"ttft": first - sent, "latency": end - sent, "tokens": tokens, "end": end - t0}


async def run_load(url, requests, rate, max_tokens, seed):
    """Open loop: Poisson arrivals at `rate` per second (inf: all at once). A request is (task,
    prompt) or (task, prompt, its own token count)."""
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in requests:
        times.append(t)
        t += 0 if rate == float("inf") else rng.expovariate(rate)
    limits = httpx.Limits(max_connections=len(requests) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.monotonic()
        results = await asyncio.gather(
            *[
                one_request(client, url, task, prompt, length[0] if length else max_tokens, at, t0)
                for (task, prompt, *length), at in zip(requests, times)
            ]
        )
    span = max(r["end"] for r in results)
    return summarize(results, span, rate)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(results, span, rate):
    ttft, latency = [r["ttft"] for r in results], [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "rate": rate,
        "requests": len(results),
        "seconds": span,
        "requests_per_s": len(results) / span,
        "tokens_per_s": tokens / span,
        "ttft_p50": percentile(ttft, 0.5),
        "ttft_p99": percentile(ttft, 0.99),
        "latency_p50": percentile(latency, 0.5),
        "latency_p99": percentile(latency, 0.99),
    }


# --- plain requests: the peer ------------------------------------------------------------------------
def peer_throughput(base, prompts, max_tokens):
    """HF transformers' continuous batching (generate_batch) on the same backbone, all prompts at once."""
    from transformers import GenerationConfig, GPT2LMHeadModel

    tokenizer = load_tokenizer()
    model = GPT2LMHeadModel.from_pretrained(base).eval()
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    config = GenerationConfig(
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=50256,
        pad_token_id=50256,
    )
    try:
        model.generate_batch(inputs=ids[:2], generation_config=config)  # warm-up
        start = time.monotonic()
        out = model.generate_batch(inputs=ids, generation_config=config)
        seconds = time.monotonic() - start
    except Exception as error:  # noqa: BLE001  (the note reports why the peer could not run)
        return {"error": f"{type(error).__name__}: {error}"}
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return {
        "requests": len(ids),
        "seconds": seconds,
        "requests_per_s": len(ids) / seconds,
        "tokens_per_s": tokens / seconds,
    }


# --- the decoding step against its products ----------------------------------------------------------
def step_breakdown(checkpoint, batches, prompt_tokens=27, new_tokens=40, repeats=3):
    """Our decoding step at batch B with a cache of prompt + new tokens, against the step's matrix
    products (every layer's four projections and the output layer) timed alone on the same shapes."""
    from engines.generate import DecodingOptions
    from engines.serve_engine import Sequence, ServingEngine
    from engines.serve_tasks import build_prompt, initial_tasks
    from models.checkpoint import load_checkpoint

    model, tokenizer, config = load_checkpoint(checkpoint)
    args = argparse.Namespace(model_checkpoint=checkpoint, task_file=None)
    tasks = initial_tasks(model, config, args)
    base = [t for t in tasks.values() if t.task.kind == "text"][0]
    c = model.config
    rows = []
    for batch in batches:
        engine = ServingEngine(model, tokenizer, tasks, max_batch_size=batch, prefill_tokens=batch * 64)
        seqs = [
            Sequence(
                base,
                build_prompt(
                    base, "x" * 2 + " the" * (prompt_tokens - 1), tokenizer, c.n_positions, "prompt"
                ),
                DecodingOptions(max_length=new_tokens + repeats + 2, no_sample=True, min_length=10**6),
            )
            for _ in range(batch)
        ]
        engine.submit(seqs)
        with torch.inference_mode():
            engine._iteration()  # prompt pass and first step
            while engine.batch.attention.shape[1] < prompt_tokens + new_tokens:
                engine._step()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                engine._step()
                times.append(time.perf_counter() - start)
        step = min(times)
        x = torch.randn(batch, c.n_embd)
        weights = [
            torch.randn(c.n_embd, 3 * c.n_embd),
            torch.randn(c.n_embd, c.n_embd),
            torch.randn(c.n_embd, 4 * c.n_embd),
            torch.randn(4 * c.n_embd, c.n_embd),
        ]
        bias = [torch.zeros(w.shape[1]) for w in weights]
        head = model.gpt2.lm_head.weight
        h4 = torch.randn(batch, 4 * c.n_embd)
        product_times = []
        with torch.inference_mode():
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(c.n_layer):
                    torch.addmm(bias[0], x, weights[0])
                    torch.addmm(bias[1], x, weights[1])
                    torch.addmm(bias[2], x, weights[2])
                    torch.addmm(bias[3], h4, weights[3])
                x @ head.T
                product_times.append(time.perf_counter() - start)
        products = min(product_times)
        rows.append(
            {"batch": batch, "step_ms": step * 1000, "products_ms": products * 1000, "ratio": step / products}
        )
    return rows


# --- the run -----------------------------------------------------------------------------------------
def bench_backbone(name, args, root):
    base = backbone_folder(name, root)
    vlm = build_vlm(base, os.path.join(root, name + "-vlm"))
    trace = trace_inputs()
    rng = random.Random(0)
    # Output lengths vary as real replies do: each request asks for exactly n tokens, n uniform
    # in [8, 2 * max_tokens - 8] (mean max_tokens), so every variant generates the same tokens.
    requests = [
        trace[rng.randrange(len(trace))] + (rng.randint(8, 2 * args.max_tokens - 8),)
        for _ in range(args.requests)
    ]
    variants = {
        "continuous": ["--max_batch_size", str(args.max_batch_size)],
        "static": [
            "--max_batch_size",
            str(args.max_batch_size),
            "--batching",
            "static",
            "--static_wait_ms",
            str(args.static_wait_ms),
        ],
        "one at a time": ["--max_batch_size", "1"],
    }
    rates = [float(r) for r in (args.rates_tiny if name == "tiny" else args.rates)]
    result = {"backbone": name, "variants": {}}
    for variant, flags in variants.items():
        server = Server(vlm, *flags)
        try:
            asyncio.run(run_load(server.url, requests[:4], float("inf"), 4, 0))  # warm-up
            points = []
            for i, rate in enumerate(rates + [float("inf")]):
                if variant == "one at a time" and rate == float("inf"):
                    continue
                point = asyncio.run(run_load(server.url, requests, rate, args.max_tokens, i))
                points.append(point)
                print(
                    f"{name} {variant} rate {rate}: {point['requests_per_s']:.2f} req/s, "
                    f"{point['tokens_per_s']:.1f} tok/s, ttft p50 {point['ttft_p50']:.2f}s",
                    flush=True,
                )
            result["variants"][variant] = points
        finally:
            server.close()
    static_saturation = max(p["requests_per_s"] for p in result["variants"]["static"])
    half = static_saturation / 2
    result["half_static_saturation"] = {"rate": half}
    for variant in ("continuous", "static"):
        flags = variants[variant]
        server = Server(vlm, *flags)
        try:
            result["half_static_saturation"][variant] = asyncio.run(
                run_load(server.url, requests, half, args.max_tokens, 99)
            )
        finally:
            server.close()
    plain = [("", p) for p in plain_inputs()[: args.requests]]
    server = Server(vlm, "--max_batch_size", str(args.max_batch_size))
    try:
        backbone_task = os.path.basename(os.path.normpath(base))
        plain_requests = [(backbone_task, p) for _, p in plain]
        asyncio.run(run_load(server.url, plain_requests[:2], float("inf"), 4, 0))
        result["plain_ours"] = asyncio.run(
            run_load(server.url, plain_requests, float("inf"), args.max_tokens, 0)
        )
    finally:
        server.close()
    result["plain_peer"] = peer_throughput(base, [p for _, p in plain], args.max_tokens)
    result["step"] = step_breakdown(vlm, args.step_batches)
    return result


def targets(result):
    v = result["variants"]
    best = {name: max(p["requests_per_s"] for p in points) for name, points in v.items()}
    half = result["half_static_saturation"]
    out = [
        ("continuous / static, highest throughput", best["continuous"] / best["static"], 1.5),
        ("continuous / one at a time, highest throughput", best["continuous"] / best["one at a time"], 5.0),
        (
            "static / continuous p50 time to first token at half static's saturation",
            half["static"]["ttft_p50"] / half["continuous"]["ttft_p50"],
            2.0,
        ),
    ]
    if "error" not in result["plain_peer"]:
        out.append(
            (
                "ours / HF continuous batching, plain requests, tokens/s",
                result["plain_ours"]["tokens_per_s"] / result["plain_peer"]["tokens_per_s"],
                1.0,
            )
        )
    return [{"name": n, "value": val, "target": t, "met": val >= t} for n, val, t in out]


def markdown(results, args):
    lines = [
        "# Serving bench",
        "",
        f"`python bench/serve.py {' '.join(sys.argv[1:])}` on {os.cpu_count()} CPU "
        f"cores; {args.requests} requests per rate, greedy, each exactly n new tokens with n uniform in "
        f"[8, {2 * args.max_tokens - 8}] (the p-tuned sentiment task stops at its 8); four tasks "
        "of four methods (nlg adapter, mt LoRA, dialogue prefix, sentiment p-tuning).",
        "",
    ]
    for r in results:
        lines += [
            f"## {r['backbone']}",
            "",
            "| variant | rate (req/s) | req/s | tokens/s | TTFT p50 | TTFT p99 | latency p50 | latency p99 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for variant, points in r["variants"].items():
            for p in points:
                lines.append(
                    f"| {variant} | {p['rate']:g} | {p['requests_per_s']:.2f} | {p['tokens_per_s']:.1f} | "
                    f"{p['ttft_p50']:.2f} s | {p['ttft_p99']:.2f} s | {p['latency_p50']:.2f} s | "
                    f"{p['latency_p99']:.2f} s |"
                )
        half = r["half_static_saturation"]
        lines += [
            "",
            f"At half of static batching's saturation ({half['rate']:.2f} req/s): TTFT p50 "
            f"{half['continuous']['ttft_p50']:.2f} s continuous, {half['static']['ttft_p50']:.2f} s static.",
            "",
        ]
        peer = r["plain_peer"]
        peer_text = (
            f"{peer['tokens_per_s']:.1f} tokens/s"
            if "error" not in peer
            else f"could not run: {peer['error']}"
        )
        lines += [
            f"Plain requests (the backbone alone, all at once): ours {r['plain_ours']['tokens_per_s']:.1f} "
            f"tokens/s; HF transformers `generate_batch` {peer_text}.",
            "",
            "| batch | decoding step | its products alone | ratio |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {s['batch']} | {s['step_ms']:.1f} ms | {s['products_ms']:.1f} ms | {s['ratio']:.2f} |"
            for s in r["step"]
        ]
        lines += ["", "| target | value | needed | met |", "|---|---:|---:|---|"]
        lines += [
            f"| {t['name']} | {t['value']:.2f} | {t['target']:g} | {'yes' if t['met'] else 'NO'} |"
            for t in r["targets"]
        ]
        lines.append("")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, r in zip(axes[0], results):
        for variant, points in r["variants"].items():
            ax.plot(
                [p["tokens_per_s"] for p in points], [p["latency_p50"] for p in points], "o-", label=variant
            )
        ax.set_xlabel("generated tokens / s")
        ax.set_ylabel("end-to-end latency p50 (s)")
        ax.set_title(r["backbone"])
        ax.set_xscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=["stand-in", "gpt2-small-shape"],
        choices=["stand-in", "gpt2-small-shape", "tiny"],
    )
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max_tokens", type=int, default=40)
    parser.add_argument("--max_batch_size", type=int, default=64)
    parser.add_argument("--static_wait_ms", type=float, default=100)
    parser.add_argument("--rates", nargs="+", default=["0.5", "2", "8"])
    parser.add_argument("--rates_tiny", nargs="+", default=["4", "16"])
    parser.add_argument("--step_batches", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--output_dir", default=os.path.join(REPO, "bench"))
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.backbones:
            result = bench_backbone(name, args, root)
            result["targets"] = targets(result)
            results.append(result)
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "serve_results.json"), "w") as f:
                json.dump({"command": sys.argv, "cpu_count": os.cpu_count(), "results": results}, f, indent=1)
            with open(os.path.join(args.output_dir, "serve_results.md"), "w") as f:
                f.write(markdown(results, args))
            plot(results, os.path.join(args.output_dir, "serve_throughput_latency.png"))
    print(markdown(results, args))


if __name__ == "__main__":
    main()
