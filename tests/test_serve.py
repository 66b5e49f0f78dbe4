"""serve.py: a real uvicorn process on 127.0.0.1 (a free port), spoken to with the official openai
client and raw HTTP. Each answer under concurrent mixed traffic (adapter, LoRA, prefix, prompt
tuning and a p-tuned user task, greedy and seeded sampling) equals evaluate.py's for the same
checkpoint and input; streams equal whole answers; a client that leaves frees its row; tasks are
added, replaced and removed mid-traffic without changing other answers; a full queue is 429,
SIGTERM drains and exits 0, malformed requests get OpenAI's error JSON naming the field, and a
damaged task module fails only its own requests."""

import dataclasses
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import REPO, tiny_method_options

import evaluate
from bench import serve as bench_serve
from engines.generate import DecodingOptions, generate
from engines.serve_engine import Sequence, ServingEngine
from engines.serve_tasks import build_prompt, initial_tasks
from engines.specs import builtin_spec, task_spec
from models.checkpoint import load_checkpoint, save_checkpoint
from models.methods import method_class
from models.vlm import VersatileLM
from tasks.task_file import load_task_file, user_task_methods
from utils.data import load_tokenizer

API_KEY = "test-key"
ADMIN = "admin-secret"
TASK_FILE = {
    "task_templates": [
        {
            "taskname": "sentiment",
            "prompt_template": "<|VIRTUAL_PROMPT_0|> {sentence} sentiment: {label}",
            "total_virtual_tokens": 4,
            "virtual_token_splits": [4],
            "answer_field": "label",
            "method": "ptuning",
            "method_options": {"hidden": 16},
            "metric": "accuracy",
            "max_answer_tokens": 6,
            "stop": [],
        }
    ]
}
METHODS = {"nlg": "adapter", "mt": "lora", "dialogue": "prefix", "qa": "prompt"}
INPUTS = {
    "nlg": ["name[The Vaults], eatType[pub]", "name[Alimentum], area[city centre], customer rating[low]"],
    "mt": ["a man is sleeping .", "two dogs play in the park near the river ."],
    "dialogue": [
        {"personality": ["i like dogs .", "i am a cook ."], "history": ["hi !"]},
        {"personality": ["i read books ."], "history": ["hello", "hi , how are you ?", "fine ."]},
    ],
    "qa": [{"document": "The cat sat on the mat. It was red.", "history": ["What sat?"]}],
    "sentiment": ["Profit rose sharply .", "The company cut jobs ."],
}
GREEDY_TOKENS, SAMPLED_TOKENS, SEED = 12, 6, 100


def perturbed_model(base, specs, seed):
    model = VersatileLM.from_pretrained(base, specs).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.tasks.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
        wte = model.gpt2.get_input_embeddings().weight
        for task in model.tasks.values():
            if task.token_ids:
                wte[list(task.token_ids)] += torch.randn(
                    len(task.token_ids), wte.shape[1], generator=generator
                )
    model.export_methods()
    return model


def specs_for(methods_by_task, user_tasks):
    specs = []
    for task, spec in methods_by_task.items():
        options = {m: method_class(m).resolve(o) for m, o in tiny_method_options(spec).items()}
        if task in user_tasks:
            specs.append(
                task_spec(
                    user_tasks[task],
                    {m: method_class(m).resolve(o) for m, o in user_task_methods(user_tasks[task]).items()},
                )
            )
        else:
            specs.append(builtin_spec(task, options))
    return specs


def write_checkpoint(base, folder, methods_by_task, user_tasks, seed):
    model = perturbed_model(base, specs_for(methods_by_task, user_tasks), seed)
    meta = {t: user_tasks[t].checkpoint_meta() for t in methods_by_task if t in user_tasks}
    save_checkpoint(
        model, load_tokenizer(), str(folder), "adapter", list(methods_by_task), base, task_meta=meta
    )
    return str(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("serve")
    (root / "tasks.json").write_text(json.dumps(TASK_FILE))
    user_tasks = load_task_file(str(root / "tasks.json"))
    vlm = write_checkpoint(tiny_base, root / "vlm", dict(METHODS, sentiment="ptuning"), user_tasks, 1)
    admin_root = root / "admin"
    admin_root.mkdir()
    extra = {
        "mt_lora2": write_checkpoint(tiny_base, admin_root / "mt_lora2", {"mt": "lora"}, user_tasks, 7),
        "summarization": write_checkpoint(
            tiny_base, admin_root / "summarization", {"summarization": "houlsby"}, user_tasks, 8
        ),
    }
    return {"root": root, "vlm": vlm, "base": tiny_base, "admin_root": str(admin_root), **extra}


# --- a server process --------------------------------------------------------------------------------
class Server(bench_serve.Server):
    """serve.py as bench/serve.py starts it (one thread, stderr to `log`), with the tests' calls."""

    def __init__(self, checkpoint, *flags, log=None):
        super().__init__(
            checkpoint, *flags, env={"OMP_NUM_THREADS": "1"}, log=str(log or os.devnull), ready_timeout=120
        )
        assert self.url.startswith("http://127.0.0.1:")

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def post(self, path, body=None, token=API_KEY, **kwargs):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=120, **kwargs)

    def health(self):
        return httpx.get(self.url + "/health", timeout=10).json()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(setup):
    s = Server(
        setup["vlm"],
        "--api_key",
        API_KEY,
        "--admin_token",
        ADMIN,
        "--admin_root",
        setup["admin_root"],
        "--max_batch_size",
        "6",
    )
    yield s
    s.close()


def wait_until(condition, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# --- what evaluate.py writes ---------------------------------------------------------------------------
def evaluate_outputs(checkpoint, task, items, monkeypatch, capsys, sampled):
    """evaluate.py --input - on these inputs (JSON lines): its output texts, in order."""
    flags = (
        ["--max_length", str(SAMPLED_TOKENS), "--seed", str(SEED)]
        if sampled
        else ["--no_sample", "--max_length", str(GREEDY_TOKENS)]
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(json.dumps(i) + "\n" for i in items)))
    capsys.readouterr()
    evaluate.main(
        ["--model_checkpoint", checkpoint, "--task", task, "--input", "-", "--device", "cpu", *flags]
    )
    return [json.loads(line)["output"] for line in capsys.readouterr().out.splitlines()]


def as_prompt(item):
    return item if isinstance(item, str) else json.dumps(item)


def request_settings(sampled, index):
    if sampled:  # evaluate.py seeds input line i with --seed + i
        return dict(max_tokens=SAMPLED_TOKENS, temperature=0.7, top_p=0.9, seed=SEED + index)
    return dict(max_tokens=GREEDY_TOKENS, temperature=0)


def test_concurrent_mixed_traffic_equals_evaluate_py(setup, server, monkeypatch, capsys):
    expected, jobs = {}, []
    for task, items in INPUTS.items():
        for sampled in (False, True):
            texts = evaluate_outputs(setup["vlm"], task, items, monkeypatch, capsys, sampled)
            for index, (item, text) in enumerate(zip(items, texts)):
                expected[task, sampled, index] = text
                jobs += [(task, sampled, index, item)] * 2  # each twice: alone and among others
    assert any(expected.values())
    random.Random(0).shuffle(jobs)
    client = server.client()
    answers = {}

    def send(job, delay):
        task, sampled, index, item = job
        time.sleep(delay)
        reply = client.completions.create(
            model=task, prompt=as_prompt(item), **request_settings(sampled, index)
        )
        answers.setdefault(job[:3], []).append(reply.choices[0].text)

    rng = random.Random(1)
    threads = [threading.Thread(target=send, args=(job, rng.uniform(0, 0.5))) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(answers) == sorted(expected)
    for key, texts in answers.items():
        assert texts == [expected[key]] * 2, key

    # a list prompt is evaluate.py's stdin lines: prompt i seeded with seed + i
    reply = client.completions.create(
        model="nlg", prompt=INPUTS["nlg"], max_tokens=SAMPLED_TOKENS, temperature=0.7, top_p=0.9, seed=SEED
    )
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == [
        expected["nlg", True, i] for i in range(len(INPUTS["nlg"]))
    ]
    assert reply.usage.completion_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length")


def test_every_method_shares_the_loop_with_single_row_tokens(tiny_base, tmp_path):
    """In process: the twelve methods over five tasks, joining the running batch at random steps,
    each row's tokens those of decoding it alone (greedy and sampled)."""
    by_task = {
        "qa": "adapter+lora",
        "mt": "houlsby+prefix+ln",
        "nlg": "ptuning+krona+adapterbias",
        "dialogue": "parallel+compacter+prompt",
        "summarization": "unipelt",
    }
    path = write_checkpoint(tiny_base, tmp_path / "every", by_task, {}, 3)
    model, tokenizer, config = load_checkpoint(path)
    tasks = initial_tasks(model, config, type("A", (), {"model_checkpoint": path, "task_file": None})())
    inputs = {
        "qa": INPUTS["qa"][0],
        "mt": INPUTS["mt"][0],
        "nlg": INPUTS["nlg"][1],
        "dialogue": INPUTS["dialogue"][1],
        "summarization": "a long text about the weather in the city .",
        "tiny_gpt2": "Hello there",
    }
    name = [n for n in tasks if tasks[n].task.kind == "text"][0]
    inputs[name] = inputs.pop("tiny_gpt2")
    engine = ServingEngine(model, tokenizer, tasks, max_batch_size=4, prefill_tokens=64)
    engine.start()
    seqs = []
    try:
        for round_ in range(2):
            for task, item in inputs.items():
                options = DecodingOptions(max_length=8, no_sample=round_ == 0, seed=5)
                seq = Sequence(
                    tasks[task], build_prompt(tasks[task], item, tokenizer, 512, "prompt"), options
                )
                engine.submit([seq])
                seqs.append(seq)
                time.sleep(random.Random(len(seqs)).uniform(0, 0.02))
        assert wait_until(lambda: all(s.finished for s in seqs), 60)
    finally:
        engine.stop()
    for seq in seqs:
        prompt = dataclasses.replace(seq.prompt, meta={"index": 0})
        alone = generate(
            model,
            [prompt],
            DecodingOptions(max_length=8, no_sample=seq.options.no_sample, seed=5),
            progress=False,
        )[0]
        assert seq.error is None and seq.ids == alone, (seq.task_name, seq.options.no_sample)


def test_long_replies_outgrow_the_cache_room_with_single_row_tokens(setup):
    """Replies of 150 tokens outgrow GrowingLayer's room (reallocated twice) while rows join and
    leave: each row's tokens still those of decoding it alone."""
    model, tokenizer, config = load_checkpoint(setup["vlm"])
    tasks = initial_tasks(
        model, config, type("A", (), {"model_checkpoint": setup["vlm"], "task_file": None})()
    )
    engine = ServingEngine(model, tokenizer, tasks, max_batch_size=3)
    jobs = [
        ("nlg", INPUTS["nlg"][0], 150),
        ("mt", INPUTS["mt"][1], 20),
        ("dialogue", INPUTS["dialogue"][0], 150),
        ("mt", INPUTS["mt"][0], 90),
        ("nlg", INPUTS["nlg"][1], 140),
    ]
    seqs = []
    engine.start()
    try:
        for task, item, length in jobs:
            options = DecodingOptions(max_length=length, min_length=length, no_sample=True)
            seq = Sequence(
                tasks[task],
                build_prompt(
                    tasks[task], as_prompt(item) if task != "dialogue" else item, tokenizer, 512, "prompt"
                ),
                options,
            )
            engine.submit([seq])
            seqs.append(seq)
            time.sleep(0.05)
        assert wait_until(lambda: all(s.finished for s in seqs), 120)
    finally:
        engine.stop()
    for seq, (_, _, length) in zip(seqs, jobs):
        alone = generate(
            model, [dataclasses.replace(seq.prompt, meta={"index": 0})], seq.options, progress=False
        )[0]
        assert seq.error is None and len(seq.ids) == length and seq.ids == alone, seq.task_name


def test_streaming_equals_the_whole_answer(server):
    client = server.client()
    for task, item in [
        ("nlg", INPUTS["nlg"][0]),
        ("mt", INPUTS["mt"][1]),
        ("sentiment", INPUTS["sentiment"][0]),
    ]:
        whole = client.completions.create(model=task, prompt=as_prompt(item), max_tokens=20, temperature=0)
        chunks = list(
            client.completions.create(
                model=task,
                prompt=as_prompt(item),
                max_tokens=20,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # chat: dialogue's system messages are its persona, the turns its history
    item = INPUTS["dialogue"][1]
    messages = [{"role": "system", "content": p} for p in item["personality"]] + [
        {"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(item["history"])
    ]
    whole = client.chat.completions.create(model="dialogue", messages=messages, max_tokens=12, temperature=0)
    plain = client.completions.create(model="dialogue", prompt=json.dumps(item), max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == plain.choices[0].text
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="dialogue", messages=messages, max_tokens=12, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == plain.choices[0].text


def test_a_client_that_leaves_frees_its_row(server):
    name = [m.id for m in server.client().models.list().data if m.kind == "text"][0]
    body = {
        "model": name,
        "prompt": "Once upon a time",
        "max_tokens": 480,
        "min_tokens": 480,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60
    ) as response:
        lines = response.iter_lines()
        next(lines)
        assert server.health()["running"] == 1
    assert wait_until(lambda: server.health()["running"] == 0, 10)
    # not streaming: the client gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/completions", json=dict(body, stream=False), headers=headers, timeout=0.3
        )
    assert wait_until(lambda: server.health()["running"] == 0, 10)
    metrics = httpx.get(server.url + "/metrics").text
    counted = [line for line in metrics.splitlines() if line.startswith("vlm_requests_total")]
    assert f'vlm_requests_total{{status="499",task="{name}"}} 2.0' in counted, counted


def test_admin_changes_mid_traffic_leave_other_answers_unchanged(setup, server, monkeypatch, capsys):
    client = server.client()
    item = {
        "model": "nlg",
        "prompt": INPUTS["nlg"][1],
        "max_tokens": 60,
        "temperature": 0,
        "extra_body": {"min_tokens": 60},
    }
    before = client.completions.create(**item).choices[0].text
    admin = {"Authorization": f"Bearer {ADMIN}"}
    streamed, done = [], threading.Event()

    def stream():
        for chunk in client.completions.create(**item, stream=True):
            streamed.append(chunk.choices[0].text if chunk.choices else "")
        done.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert wait_until(lambda: len(streamed) > 0, 20)
    added = httpx.post(
        server.url + "/admin/tasks", json={"checkpoint": setup["summarization"]}, headers=admin, timeout=60
    )
    assert added.status_code == 200, added.text
    assert added.json()["tasks"] == [
        {"id": "summarization", "kind": "seq2seq", "methods": ["houlsby"], "replaced": False}
    ]
    replaced = httpx.post(
        server.url + "/admin/tasks", json={"checkpoint": "mt_lora2"}, headers=admin, timeout=60
    )
    assert replaced.status_code == 200 and replaced.json()["tasks"][0]["replaced"] is True
    removed = httpx.delete(server.url + "/admin/tasks/dialogue", headers=admin, timeout=60)
    assert removed.status_code == 200
    thread.join(timeout=60)
    assert done.is_set() and "".join(streamed) == before
    models = {m.id: m for m in client.models.list().data}
    assert "dialogue" not in models and models["summarization"].methods == ["houlsby"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="dialogue", prompt="hi", max_tokens=3)
    for task, checkpoint in (("mt", setup["mt_lora2"]), ("summarization", setup["summarization"])):
        items = INPUTS["mt"]
        want = evaluate_outputs(checkpoint, task, items, monkeypatch, capsys, sampled=False)
        got = [
            client.completions.create(model=task, prompt=i, **request_settings(False, 0)).choices[0].text
            for i in items
        ]
        assert got == want, task
    assert client.completions.create(**item).choices[0].text == before

    # refusals: no token, a path outside the root, a damaged checkpoint; serving goes on
    assert httpx.post(server.url + "/admin/tasks", json={"checkpoint": "mt_lora2"}).status_code == 401
    outside = httpx.post(server.url + "/admin/tasks", json={"checkpoint": setup["vlm"]}, headers=admin)
    assert outside.status_code == 403 and "outside" in outside.json()["error"]["message"]
    damaged = os.path.join(setup["admin_root"], "damaged")
    write_checkpoint(setup["base"], damaged, {"mt": "lora"}, {}, 9)
    with open(os.path.join(damaged, "adapters.safetensors"), "r+b") as f:
        f.truncate(100)
    refused = httpx.post(server.url + "/admin/tasks", json={"checkpoint": "damaged"}, headers=admin)
    assert refused.status_code == 400 and "adapters.safetensors" in refused.json()["error"]["message"]
    assert client.completions.create(**item).choices[0].text == before


def test_a_damaged_task_module_fails_only_its_requests(setup, tiny_base, tmp_path):
    """Finite but huge weights (they pass the load checks) make NaN logits: that request gets an
    error; a request of another task sharing its batch is answered as usual."""
    path = write_checkpoint(tiny_base, tmp_path / "huge", {"mt": "adapter", "nlg": "adapter"}, {}, 2)
    from safetensors.torch import load_file, save_file

    weights = os.path.join(path, "adapters.safetensors")
    tensors = load_file(weights)
    for key in tensors:
        if key.startswith("methods.mt.") or key.startswith("adapters.mt."):
            tensors[key] = torch.full_like(tensors[key], 3e38)
    save_file(tensors, weights, {"format": "pt"})
    s = Server(path, "--max_batch_size", "4")
    try:
        results = {}

        def send(task):
            results[task] = httpx.post(
                s.url + "/v1/completions",
                json={"model": task, "prompt": INPUTS[task][0], "max_tokens": 8, "temperature": 0},
                timeout=60,
            )

        threads = [threading.Thread(target=send, args=(t,)) for t in ("mt", "nlg")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert results["mt"].status_code == 500 and "damaged" in results["mt"].json()["error"]["message"]
        assert results["nlg"].status_code == 200 and results["nlg"].json()["choices"][0]["text"] is not None
        assert s.health()["status"] == "ok"
    finally:
        s.close()


MALFORMED = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "mt", "prompt": 5}, 400, "prompt"),
    ({"model": "mt", "prompt": [1, 2, 3]}, 400, "prompt"),
    ({"model": "mt", "prompt": []}, 400, "prompt"),
    ({"model": "mt", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "mt", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "mt", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "mt", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "mt", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": "mt", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "mt", "prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ({"model": "mt", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "mt", "prompt": "x", "seed": -1}, 400, "seed"),
    ({"model": "mt", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "mt", "prompt": "x", "stop": [""]}, 400, "stop"),
    ({"model": "mt", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "mt", "prompt": "x", "logprobs": 5}, 400, "logprobs"),
    ({"model": "mt", "prompt": "x", "echo": True}, 400, "echo"),
    ({"model": "mt", "prompt": "x", "min_tokens": 500, "max_tokens": 5}, 400, "min_tokens"),
    ({"model": "qa", "prompt": "just text"}, 400, "prompt"),
    ({"model": "nlg", "prompt": "colour[red]"}, 400, "prompt"),
    ({"model": "mt", "prompt": "\ud800"}, 400, "prompt"),
    ({"model": "nlg", "prompt": "name[" + "word " * 600 + "]"}, 400, "prompt"),
    ({"model": "sentiment", "prompt": {"wrong": "x"}}, 400, "prompt"),
]
CHAT_MALFORMED = [
    ({"model": "mt", "messages": [{"role": "user", "content": "hi"}]}, 400, "messages"),
    ({"model": "dialogue", "messages": []}, 400, "messages"),
    ({"model": "dialogue", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0]"),
    ({"model": "dialogue", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (
        {
            "model": "dialogue",
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        },
        400,
        "messages",
    ),
    ({"model": "qa", "messages": [{"role": "user", "content": "What sat?"}]}, 400, "messages"),
]


def test_malformed_requests_get_an_error_naming_the_field_and_serving_goes_on(setup, tiny_base, tmp_path):
    s = Server(
        write_checkpoint(
            tiny_base,
            tmp_path / "vlm",
            dict(METHODS, sentiment="ptuning"),
            load_task_file(str(setup["root"] / "tasks.json")),
            1,
        ),
        "--api_key",
        API_KEY,
        "--max_body_bytes",
        "20000",
    )
    try:
        good = {"model": "nlg", "prompt": INPUTS["nlg"][0], "max_tokens": 6, "temperature": 0}
        answer = s.post("/v1/completions", good).json()["choices"][0]["text"]
        headers = {"Authorization": f"Bearer {API_KEY}"}
        for route, cases in (("/v1/completions", MALFORMED), ("/v1/chat/completions", CHAT_MALFORMED)):
            for body, status, param in cases:
                if isinstance(body, bytes):
                    reply = httpx.post(s.url + route, content=body, headers=headers)
                else:
                    reply = httpx.post(s.url + route, content=json.dumps(body).encode(), headers=headers)
                assert reply.status_code == status, (body, reply.text)
                error = reply.json()["error"]
                assert error["message"] and error["param"] == param, (body, error)
        assert httpx.post(s.url + "/v1/completions", content=b"x" * 30000, headers=headers).status_code == 413
        assert httpx.post(s.url + "/v1/completions", json=good).status_code == 401
        assert (
            httpx.post(
                s.url + "/v1/completions", json=good, headers={"Authorization": "Bearer wrong"}
            ).status_code
            == 401
        )
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert s.post("/admin/tasks", {"checkpoint": "x"}, token=ADMIN).status_code == 403  # admin is off
        assert s.post("/v1/completions", good).json()["choices"][0]["text"] == answer
        assert s.health()["status"] == "ok"
    finally:
        s.close()


def test_a_full_queue_is_429_and_sigterm_drains_then_exits_0(setup, tmp_path):
    s = Server(setup["vlm"], "--max_batch_size", "1", "--max_queue", "1", log=tmp_path / "err.log")
    name = [m["id"] for m in httpx.get(s.url + "/v1/models").json()["data"] if m["kind"] == "text"][0]
    body = {
        "model": name,
        "prompt": "Once upon a time",
        "max_tokens": 300,
        "min_tokens": 300,
        "temperature": 0,
    }
    replies = {}

    def send(key):
        replies[key] = httpx.post(s.url + "/v1/completions", json=body, timeout=120)

    first = threading.Thread(target=send, args=("running",))
    first.start()
    assert wait_until(lambda: s.health()["running"] == 1)
    second = threading.Thread(target=send, args=("waiting",))
    second.start()
    assert wait_until(lambda: s.health()["waiting"] == 1)
    full = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
    assert full.status_code == 429 and full.headers["Retry-After"] == "1"
    assert full.json()["error"]["type"] == "rate_limit_error"
    s.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: httpx.post(s.url + "/v1/completions", json=body).status_code == 503, 10)
    assert s.proc.wait(timeout=120) == 0
    first.join()
    second.join()
    assert replies["running"].status_code == 200 and replies["waiting"].status_code == 200
    assert replies["running"].json()["choices"][0]["text"] == replies["waiting"].json()["choices"][0]["text"]
    assert replies["running"].json()["usage"]["completion_tokens"] == 300


def test_models_health_and_metrics(server):
    models = {m.id: m for m in server.client().models.list().data}
    assert {t: models[t].kind for t in ("nlg", "mt", "qa", "sentiment")} == {
        "nlg": "nlg",
        "mt": "seq2seq",
        "qa": "qa",
        "sentiment": "template",
    }
    assert models["nlg"].methods == ["adapter"] and models["sentiment"].methods == ["ptuning"]
    assert server.health()["status"] == "ok"
    server.client().completions.create(model="nlg", prompt=INPUTS["nlg"][0], max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "vlm_requests_total",
        "vlm_generated_tokens_total",
        "vlm_queue_prompts",
        "vlm_running_rows",
        "vlm_kv_cache_bytes",
        "vlm_time_to_first_token_seconds_bucket",
        "vlm_time_per_output_token_seconds_bucket",
    ):
        assert name in text, name
    assert 'vlm_requests_total{status="200",task="nlg"}' in text


def test_serve_py_refuses_bad_flags_with_one_error_line(setup):
    for flags, message in (
        (["--max_batch_size", "0"], "--max_batch_size"),
        (["--admin_token", "x"], "--admin_root"),
        (["--port", "70000"], "--port"),
    ):
        done = subprocess.run(
            [sys.executable, "serve.py", "--model_checkpoint", setup["vlm"], *flags],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"),
        )
        assert done.returncode != 0 and done.stderr.startswith("error:") and message in done.stderr, (
            done.stderr
        )
        assert "Traceback" not in done.stderr
