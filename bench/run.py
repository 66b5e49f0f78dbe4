"""Speed and memory of vlm against the original method, measured side by side in one run.

    python bench/run.py                      # GPT-2 small's shape (124M, random weights), real sample data
    python bench/run.py --quick              # fewer prompts, repeats and baseline runs
    python bench/run.py --size tiny --quick  # a 2-layer model: checks the suite itself in seconds
    python bench/run.py --device cuda --dtype bfloat16 [--compile]    # GPU options

Sections (see bench/README.md): 1 decoding against the original decoding, 2 mixed-task batches,
3 adapter overhead, 4 adapter training against full fine-tuning (time and peak memory, each in
its own process), 5 padding of training batches, 6 evaluate.py end to end on 200 E2E MRs,
7 every per-task method (size, training cost against full fine-tuning, decoding overhead at
batch 1 and 32), 8 one batch of six methods against six single-method batches, 9 one batch of five
LoRA tasks against HF PEFT's `adapter_names` on the same weights (and our two LoRA routings).
Writes results.json (with the `targets` list) and results.md to --output_dir (default bench/).
"""
import argparse
import copy
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import transformers  # noqa: E402
from ignite.engine import Events  # noqa: E402
from torch import nn  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from bench.baseline import decode_original  # noqa: E402
from engines.generate import DecodingOptions, generate_batch  # noqa: E402
from engines.specs import adapter_specs  # noqa: E402
from engines.steps import create_trainer  # noqa: E402
from engines.training import backbone_parameter_count  # noqa: E402
from models.checkpoint import save_checkpoint  # noqa: E402
from models.vlm import VersatileLM, add_special_token_rows, backbone_fingerprint  # noqa: E402
from tasks.base import decode_text  # noqa: E402
from tasks.table import TASKS  # noqa: E402
from utils.data import LengthGroupedBatchSampler, collate, load_tokenizer  # noqa: E402
from utils.errors import ArgumentParser, VLMError, exit_on_user_error  # noqa: E402
from utils.io import write_json, write_text  # noqa: E402
from utils.progress import progress_bar  # noqa: E402
from utils.vocab import PAD_ID  # noqa: E402

SIZES = {"tiny": dict(n_layer=2, n_embd=128, n_head=4),
         "small": dict(n_layer=12, n_embd=768, n_head=12),     # GPT-2 small, 124M
         "medium": dict(n_layer=24, n_embd=1024, n_head=16)}   # GPT-2 medium, 355M
SAMPLES = os.path.join(ROOT, "data", "samples")
E2E_200 = os.path.join(SAMPLES, "nlg_dev200.json")
TRAIN_TASK = "mt"


@dataclasses.dataclass
class Plan:
    """How much each section runs. quick: the same measurements on fewer prompts and repeats."""
    decode_rows: int = 32          # 1: E2E prompts decoded in one batch
    max_length: int = 40           # 1, 6: tokens per output
    baseline_rows: int = 32        # 1: of those, decoded the original way too
    mixed_rows: int = 8            # 2: rows per task
    mixed_context: int = 128       # 2: prompt tokens kept (the last ones)
    mixed_steps: int = 24          # 2: decoding steps timed after the prompt pass
    mixed_repeats: int = 5         # 2, 8, 9: interleaved repeats (the fastest counts)
    forward_batch: int = 32        # 3: forward pass batch x length
    forward_length: int = 128
    repeats: int = 3               # 1: runs of ours, interleaved with the original;
                                   # 3: repeats (fastest counts)
    train_steps: int = 6           # 4: optimizer steps per mode (the first is not timed)
    train_runs: int = 2            # 4: alternating processes per mode
    padding_steps: int = 2         # 5: training steps per task and batching (+1 warm-up)
    e2e_baseline_mrs: int = 16     # 6: MRs decoded the original way (the rest extrapolated)


QUICK = Plan(baseline_rows=4, mixed_context=64, mixed_steps=12, mixed_repeats=2, forward_batch=8, repeats=2,
             train_steps=3, train_runs=1, padding_steps=1, e2e_baseline_mrs=4)


# --- helpers ---------------------------------------------------------------------------------
class Clock:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def build_backbone(size, device, dtype, seed=0):
    """GPT-2 of the size's shape with random weights (same seed, same weights), special rows added."""
    torch.manual_seed(seed)
    gpt2 = GPT2LMHeadModel(GPT2Config(**SIZES[size], n_positions=1024))
    add_special_token_rows(gpt2)
    return gpt2.to(device=device, dtype=dtype).eval()


def compiled(model, args):
    if args.compile:
        model.gpt2.forward = torch.compile(model.gpt2.forward, dynamic=True, mode=args.compile_mode)
    return model


class PlainGPT2(nn.Module):
    """Hugging Face GPT-2 with no hooks and no adapters, behind VersatileLM's call (task_ids ignored)."""

    def __init__(self, gpt2):
        super().__init__()
        self.gpt2 = gpt2

    config = property(lambda self: self.gpt2.config)
    device = property(lambda self: self.gpt2.device)

    def forward(self, input_ids, task_ids=None, use_cache=False, **kwargs):
        # use_cache as VersatileLM's: off unless decoding asks (GPT-2's config would turn it on)
        return self.gpt2(input_ids=input_ids, use_cache=use_cache, **kwargs)


def task_prompts(task, path, tokenizer, limit, task_id=None):
    """Decoding prompts of a task's evaluation split, as evaluate.py builds them."""
    records = task.load_data(path, tokenizer, [task.test_split])[task.test_split]
    task_id = task.task_id if task_id is None else task_id
    return task.dataset_prompts(records, task.max_history, tokenizer, task_id)[:limit]


def keep_last(prompt, tokens):
    return dataclasses.replace(prompt, input_ids=prompt.input_ids[-tokens:],
                               token_type_ids=prompt.token_type_ids[-tokens:], meta={})


def as_task(prompt, task):
    """The same prompt decoded through another task's adapter (the single-task comparison)."""
    return dataclasses.replace(prompt, task_id=task.task_id, stop_ids=tuple(task.token_ids()),
                               banned_ids=task.banned_ids(), meta={})


def timed_generation(model, prompts, steps, clock):
    """Generate exactly `steps` tokens per row (stop tokens masked); times the whole call and the
    decoding phase after the pass over the prompts. Returns a dict of figures."""
    options = DecodingOptions(max_length=steps, min_length=steps, no_sample=True)
    marks = {}

    def on_step(step, rows):
        if step == 0:
            marks["prompt_pass"] = clock()

    start = clock()
    outputs = generate_batch(model, prompts, options, on_step)
    end = clock()
    tokens = sum(len(o) for o in outputs)
    return {"seconds": end - start, "decode_seconds": end - marks["prompt_pass"], "tokens": tokens,
            "decode_tokens": tokens - sum(1 for o in outputs if o)}


def proc_status_bytes(field):
    """A memory figure of this process from Linux's /proc/self/status (VmRSS: now, VmHWM: peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise VLMError(f"/proc/self/status has no {field}")


def peak_memory_bytes():
    """Peak resident memory of this process image. VmHWM, not getrusage's ru_maxrss: Linux
    carries the parent's resident size at fork into a child's ru_maxrss."""
    try:
        return proc_status_bytes("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# --- 1. decoding ---------------------------------------------------------------------------------
def bench_decoding(args, plan, device, clock, tokenizer):
    task = TASKS["nlg"]
    model = compiled(VersatileLM(build_backbone(args.size, device, args.dtype),
                                 adapter_specs({"nlg": task.bottleneck})), args).eval()
    prompts = task_prompts(task, E2E_200, tokenizer, plan.decode_rows)
    options = DecodingOptions(max_length=plan.max_length, no_sample=True)
    generate_batch(model, prompts[:2], DecodingOptions(max_length=2, no_sample=True))  # warm-up
    # Interleaved: ours, a share of the baseline prompts, ours, ... so that both see the same
    # machine (shared CPUs drift by tens of percent over minutes).
    rounds = min(plan.repeats, plan.baseline_rows)
    ours_runs, baseline_runs, baseline = [], [], []
    with progress_bar(total=plan.baseline_rows, desc="1 decoding: original method", leave=False) as bar:
        for index in range(rounds):
            start = clock()
            ours = generate_batch(model, prompts, options)
            ours_runs.append({"tokens": sum(map(len, ours)), "seconds": clock() - start})
            start, share = clock(), []
            for prompt in prompts[index * plan.baseline_rows // rounds:
                                  (index + 1) * plan.baseline_rows // rounds]:
                share.append(decode_original(model, prompt, plan.max_length))
                bar.update()
            baseline_runs.append({"tokens": sum(map(len, share)), "seconds": clock() - start})
            baseline += share
    # The fastest round of each, as in every other section: the least disturbed by the machine
    # (the baseline's rounds decode different prompts, so its rate is per token of each round).
    ours_rate = max(r["tokens"] / r["seconds"] for r in ours_runs)
    baseline_rate = max(r["tokens"] / r["seconds"] for r in baseline_runs)
    overall = (sum(r["tokens"] for r in ours_runs) / sum(r["seconds"] for r in ours_runs)) \
        / (sum(r["tokens"] for r in baseline_runs) / sum(r["seconds"] for r in baseline_runs))
    return {"prompts": len(prompts), "batch_size": len(prompts), "max_length": plan.max_length,
            "ours_runs": rounds,
            "prompt_tokens_mean": statistics.mean(len(p.input_ids) for p in prompts),
            "ours_rounds": ours_runs, "ours_tokens": ours_runs[0]["tokens"], "ours_tokens_per_s": ours_rate,
            "baseline_rounds": baseline_runs, "baseline_prompts": len(baseline),
            "baseline_tokens": sum(r["tokens"] for r in baseline_runs),
            "baseline_seconds": sum(r["seconds"] for r in baseline_runs),
            "baseline_tokens_per_s": baseline_rate,
            "speedup": ours_rate / baseline_rate, "speedup_all_rounds": overall,
            "outputs_equal": sum(a == b for a, b in zip(ours, baseline)), "outputs_compared": len(baseline)}


# --- 2. mixed tasks --------------------------------------------------------------------------------
def bench_mixed(args, plan, device, clock, tokenizer):
    # Every task at bottleneck 100, so the single-task and mixed batches do the same adapter work.
    model = compiled(VersatileLM(build_backbone(args.size, device, args.dtype),
                                 adapter_specs({t: 100 for t in TASKS})), args).eval()
    by_task = {name: [keep_last(p, plan.mixed_context)
                      for p in task_prompts(task, os.path.join(SAMPLES, f"{name}.json"), tokenizer,
                                            plan.mixed_rows)]
               for name, task in TASKS.items()}
    short = [name for name, prompts in by_task.items() if len(prompts) < plan.mixed_rows]
    if short:
        raise VLMError(f"data/samples: fewer than {plan.mixed_rows} evaluation prompts for "
                       f"{', '.join(short)}")
    mixed = [p for prompts in by_task.values() for p in prompts]                   # 5 tasks x rows
    single_task = TASKS["dialogue"]
    single = [as_task(p, single_task) for p in mixed]                                # same rows, one task
    steps = plan.mixed_steps + 1
    timed_generation(model, mixed, 2, clock)  # warm-up
    repeats = {"mixed": [], "separate": [], "single_task": []}
    for _ in progress_bar(range(plan.mixed_repeats), desc="2 mixed tasks", leave=False):  # interleaved
        repeats["mixed"].append(timed_generation(model, mixed, steps, clock))
        separate = [timed_generation(model, prompts, steps, clock) for prompts in by_task.values()]
        repeats["separate"].append({k: sum(r[k] for r in separate) for k in separate[0]})
        repeats["single_task"].append(timed_generation(model, single, steps, clock))
    # The fastest repeat of each: the least disturbed by anything else on the machine.
    runs = {name: max(rs, key=lambda r: r["decode_tokens"] / r["decode_seconds"])
            for name, rs in repeats.items()}
    rate = {name: r["decode_tokens"] / r["decode_seconds"] for name, r in runs.items()}
    whole = {name: r["tokens"] / r["seconds"] for name, r in runs.items()}
    return {"tasks": list(TASKS), "rows_per_task": plan.mixed_rows, "context_tokens": plan.mixed_context,
            "decode_steps": plan.mixed_steps, "repeats": plan.mixed_repeats, "single_task": single_task.name,
            "bottleneck": 100,
            "runs": runs, "decode_tokens_per_s": rate, "whole_tokens_per_s": whole,
            "mixed_vs_separate": rate["mixed"] / rate["separate"],
            "mixed_vs_separate_whole": whole["mixed"] / whole["separate"],
            "routing_overhead": rate["single_task"] / rate["mixed"] - 1.0}


# --- 3. adapter overhead ---------------------------------------------------------------------------
def bench_adapter_overhead(args, plan, device, clock, tokenizer):
    task = TASKS["nlg"]
    plain = compiled(PlainGPT2(build_backbone(args.size, device, args.dtype)), args).eval()
    adapted = compiled(VersatileLM(build_backbone(args.size, device, args.dtype),
                                   adapter_specs({task.name: 100})), args).eval()
    # Real text: the E2E references, one token stream cut into rows.
    stream = [t for p in task_prompts(task, E2E_200, tokenizer, 200) for r in p.meta["references"]
              for t in tokenizer.encode(" " + r)]
    need = plan.forward_batch * plan.forward_length
    stream = (stream * (need // len(stream) + 1))[:need]
    ids = torch.tensor(stream, device=device).view(plan.forward_batch, plan.forward_length)
    forward = {"plain": [], "adapters": []}
    with torch.inference_mode():
        plain(ids), adapted(ids, task_ids=task.task_id)  # warm-up at full size (memory first touched)
        for _ in progress_bar(range(plan.repeats), desc="3 adapter overhead: forward", leave=False):
            start = clock()
            plain(ids)
            forward["plain"].append(clock() - start)
            start = clock()
            adapted(ids, task_ids=task.task_id)
            forward["adapters"].append(clock() - start)
    prompt = task_prompts(task, E2E_200, tokenizer, 1)[0]
    decoding = {"plain": [], "adapters": []}
    timed_generation(plain, [prompt], 2, clock), timed_generation(adapted, [prompt], 2, clock)  # warm-up
    for _ in progress_bar(range(plan.repeats), desc="3 adapter overhead: decoding", leave=False):
        decoding["plain"].append(timed_generation(plain, [prompt], plan.max_length, clock)["seconds"])
        decoding["adapters"].append(timed_generation(adapted, [prompt], plan.max_length, clock)["seconds"])
    fastest = lambda runs: {k: min(v) for k, v in runs.items()}  # noqa: E731
    forward, decoding = fastest(forward), fastest(decoding)
    return {"bottleneck": 100, "forward_shape": [plan.forward_batch, plan.forward_length],
            "forward_seconds": forward, "forward_overhead": forward["adapters"] / forward["plain"] - 1.0,
            "decoding_tokens": plan.max_length, "decoding_seconds": decoding,
            "decoding_overhead": decoding["adapters"] / decoding["plain"] - 1.0,
            "lora_paper": {"forward_overhead": 0.022, "decoding_overhead": 0.207}}


# --- 4. training: adapters against full fine-tuning (each in a fresh process) ----------------------
def training_batches(task, tokenizer, steps):
    records = task.load_data(os.path.join(SAMPLES, f"{task.name}.json"), tokenizer, ["train"])["train"]
    examples = task.training_examples(records, task.max_history, max_positions=1024)
    sampler = LengthGroupedBatchSampler([len(e["input_ids"]) for e in examples],
                                        task.adapter.train_batch_size, shuffle=True, seed=42)
    batches = [collate([examples[i] for i in batch], task.task_id) for batch in sampler]
    return (batches * (steps // len(batches) + 1))[:steps]


def train_worker(args):
    """One training mode in this process: prints a JSON line with step times and peak memory."""
    device = torch.device(args.device)
    task = TASKS[TRAIN_TASK]
    tokenizer = load_tokenizer()
    batches = training_batches(task, tokenizer, args.steps)
    from engines.specs import builtin_spec
    from models.methods import method_class
    if args.worker == "full":
        specs = []
    else:  # a method at its paper defaults (the adapter at the task's bottleneck)
        specs = [builtin_spec(task.name, {name: method_class(name).resolve({"bottleneck": task.bottleneck}
                                                                           if name == "adapter" else {})
                                          for name in args.worker.split("+")})]
    model = VersatileLM(build_backbone(args.size, device, torch.float32), specs)
    loaded = proc_status_bytes("VmRSS") if os.path.exists("/proc/self/status") else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()
    mode = "full" if args.worker == "full" else "adapter"
    parameters = model.mark_trainable(mode, task.name)
    hyper = task.adapter if mode == "adapter" else task.full_finetune
    optimizer = torch.optim.AdamW(parameters, lr=hyper.lr, weight_decay=0.0)
    trainer = create_trainer(model, optimizer, parameters, device, gradient_accumulation_steps=1,
                             max_norm=1.0, fp16=False, use_task_ids=bool(specs))
    clock, times = Clock(device), []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: times.append(-clock()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: times.__setitem__(-1, times[-1] + clock()))
    trainer.run(batches, max_epochs=1)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_memory_bytes()
    print(json.dumps({"mode": args.worker, "step_seconds": times,
                      "median_step_seconds": statistics.median(times[1:]),
                      "peak_bytes": peak, "loaded_bytes": loaded,
                      "batch_shapes": [list(b["input_ids"].shape) for b in batches],
                      "trainable_parameters": sum(p.numel() for p in parameters),
                      "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda"
                      else "peak resident memory (VmHWM)"}))


# glibc's mmap threshold fixed low: every tensor gets its own mapping, unmapped when freed, so a
# process's resident peak is its live bytes' peak (as max_memory_allocated on CUDA) and the same
# from run to run. With the default (dynamic) threshold freed tensors stay in the heap and the
# peak moves by ~0.2 GiB between identical runs; the extra page faults slow steps, so step times
# come from processes with the default allocator.
LIVE_BYTES_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
LIVE_BYTES_MEMORY = "peak resident memory (VmHWM) with glibc's mmap threshold at 64 KiB"


def worker_run(name, args, plan, device, live_bytes=False):
    """One training worker process (train_worker) for mode or method `name`: its JSON line."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--size", args.size,
               "--device", str(device), "--steps", str(plan.train_steps)]
    env = dict(os.environ, **LIVE_BYTES_ENV) if live_bytes else None
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise VLMError(f"training worker ({name}) failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def with_live_peak(run, name, args, plan, device):
    """run with peak_bytes the live bytes' peak: on CUDA its own max_memory_allocated; on CPU that
    of one more process of `name` whose allocator returns freed tensors at once (its step times
    are not used). The default allocator's peak is kept as default_allocator_peak_bytes."""
    run = dict(run)
    if device.type != "cuda":
        memory = worker_run(name, args, plan, device, live_bytes=True)
        run.update(default_allocator_peak_bytes=run["peak_bytes"], peak_bytes=memory["peak_bytes"],
                   loaded_bytes=memory["loaded_bytes"], memory=LIVE_BYTES_MEMORY)
    return run


def bench_training(args, plan, device, clock, tokenizer):
    runs = {"full": [], "adapter": []}
    for mode in progress_bar(["full", "adapter"] * plan.train_runs, desc="4 training (one process each)",
                             leave=False):
        runs[mode].append(worker_run(mode, args, plan, device))
    # Per mode: the fastest run's step time (the least disturbed) and the live bytes' peak.
    results = {}
    for mode, rs in runs.items():
        fastest = min(rs, key=lambda r: r["median_step_seconds"])
        if device.type == "cuda":
            fastest = dict(fastest, peak_bytes=max(r["peak_bytes"] for r in rs))
        results[mode] = with_live_peak(fastest, mode, args, plan, device)
        results[mode]["all_median_step_seconds"] = [r["median_step_seconds"] for r in rs]
        results[mode]["timing_runs_peak_bytes"] = [r["peak_bytes"] for r in rs]
    full, adapter = results["full"], results["adapter"]
    return {"task": TRAIN_TASK, "batch_size": TASKS[TRAIN_TASK].adapter.train_batch_size,
            "steps": plan.train_steps, "runs": results,
            "step_time_ratio": adapter["median_step_seconds"] / full["median_step_seconds"],
            "peak_memory_ratio": adapter["peak_bytes"] / full["peak_bytes"],
            "memory_above_loaded_ratio": (adapter["peak_bytes"] - adapter["loaded_bytes"])
            / (full["peak_bytes"] - full["loaded_bytes"])}


# --- 5. padding -----------------------------------------------------------------------------------
def bench_padding(args, plan, device, clock, tokenizer):
    model = VersatileLM(build_backbone(args.size, device, torch.float32),
                        adapter_specs({name: task.bottleneck for name, task in TASKS.items()}))
    results = {}
    for name, task in progress_bar(TASKS.items(), desc="5 padding", leave=False):
        records = task.load_data(os.path.join(SAMPLES, f"{name}.json"), tokenizer, ["train"])["train"]
        examples = task.training_examples(records, task.max_history, max_positions=model.config.n_positions)
        lengths = [len(e["input_ids"]) for e in examples]
        size = task.adapter.train_batch_size
        batches = list(LengthGroupedBatchSampler(lengths, size, shuffle=True, seed=42))
        width = max(lengths)                                        # the original: the split's longest
        ours_slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        # Real tokens per second, adapter training on the same examples batched both ways.
        parameters = model.mark_trainable("adapter", name)
        optimizer = torch.optim.AdamW(parameters, lr=task.adapter.lr, weight_decay=0.0)
        trainer = create_trainer(model, optimizer, parameters, device, use_task_ids=True)
        timed = batches[1:plan.padding_steps + 1] or batches[:1]
        trainer.run([collate([examples[i] for i in batches[0]], task.task_id)], max_epochs=1)  # warm-up
        rates = {}
        for label, make in (("ours", lambda b: collate([examples[i] for i in b], task.task_id)),
                            ("original", lambda b: collate([examples[i] for i in b], task.task_id, width))):
            data = [make(b) for b in timed]
            start = clock()
            trainer.run(data, max_epochs=1)
            rates[label] = sum(lengths[i] for b in timed for i in b) / (clock() - start)
        results[name] = {"examples": len(examples), "batch_size": size, "real_tokens": sum(lengths),
                         "max_length": width, "mean_length": statistics.mean(lengths),
                         "ours_share": sum(lengths) / ours_slots,
                         "original_share": sum(lengths) / (len(lengths) * width),
                         "timed_batches": len(timed), "ours_real_tokens_per_s": rates["ours"],
                         "original_real_tokens_per_s": rates["original"],
                         "speedup": rates["ours"] / rates["original"]}
    return {"tasks": results, "min_ours_share": min(r["ours_share"] for r in results.values())}


# --- 6. evaluate.py end to end ----------------------------------------------------------------------
def bench_end_to_end(args, plan, device, clock, tokenizer):
    task = TASKS["nlg"]
    with tempfile.TemporaryDirectory(prefix="vlm-bench-") as tmp:
        model = VersatileLM(build_backbone(args.size, device, args.dtype),
                            adapter_specs({"nlg": task.bottleneck})).eval()
        backbone, checkpoint = os.path.join(tmp, "backbone"), os.path.join(tmp, "nlg-adapter")
        model.gpt2.save_pretrained(backbone)
        save_checkpoint(model, tokenizer, checkpoint, "adapter", ["nlg"], backbone,
                        base_fingerprint=backbone_fingerprint(model.gpt2))
        output_dir = os.path.join(tmp, "eval")
        command = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--task", "nlg", "--no_sample",
                   "--max_length", str(plan.max_length), "--model_checkpoint", checkpoint, "--dataset_path",
                   E2E_200, "--dataset_cache", os.path.join(tmp, "cache"), "--output_dir", output_dir,
                   "--batch_size", "32", "--device", str(device)]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        ours_seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise VLMError(f"evaluate.py failed: {done.stderr.strip().splitlines()[-1:]}")
        with open(os.path.join(output_dir, "nlg_output.txt"), encoding="utf-8") as f:
            outputs = f.read().split("\n")
        prompts = task_prompts(task, E2E_200, tokenizer, 10 ** 6)
        sample = prompts[:plan.e2e_baseline_mrs]
        start = clock()
        baseline = [decode_text(tokenizer, decode_original(model, p, plan.max_length))
                    for p in progress_bar(sample, desc="6 end to end: original decoding", leave=False)]
        baseline_seconds = clock() - start
    estimate = baseline_seconds / len(sample) * len(prompts)
    return {"mrs": len(prompts), "max_length": plan.max_length, "ours_wall_seconds": ours_seconds,
            "ours_includes": "python start, model load, tokenization, decoding, E2E metrics, files",
            "baseline_mrs_decoded": len(sample), "baseline_seconds": baseline_seconds,
            "baseline_estimated_seconds": estimate, "baseline_includes": "decoding only",
            "speedup": estimate / ours_seconds,
            "outputs_equal": sum(a == b for a, b in zip(outputs, baseline)),
            "outputs_compared": len(baseline)}


# --- 7. per-task methods: size, training cost, decoding overhead -------------------------------------
MIXED_METHODS = ("adapter", "lora", "prefix", "prompt", "ln", "houlsby")  # section 8's six


def method_model(size, device, dtype, methods, seed=1):
    """The backbone with one bench task per method of `methods` (task ids 0, 1, ...; the paper's
    default options, the adapter at bottleneck 100), every method tensor perturbed so that each
    task changes the output (fresh methods start as the identity or near it)."""
    from models.methods import method_class
    from models.vlm import TaskSpec
    specs = [TaskSpec(f"bench_{name}", i, (), {part: method_class(part).resolve({"bottleneck": 100}
                                                                                if part == "adapter" else {})
                                              for part in name.split("+")})
             for i, name in enumerate(methods)]
    return perturbed(VersatileLM(build_backbone(size, device, dtype), specs).eval(), seed)


def perturbed(model, seed):
    """Every task's method tensors moved by N(0, 0.02): fresh methods start as the identity or near it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for task in model.tasks.values():
            for p in task.methods.parameters():
                p.add_(torch.randn(p.shape, generator=generator).to(p) * 0.02)
    return model


def method_prompts(tokenizer, rows, context, task_id):
    """`rows` E2E prompts (the last `context` tokens each) routed to bench task `task_id`."""
    task = TASKS["nlg"]
    prompts = [keep_last(p, context) for p in task_prompts(task, E2E_200, tokenizer, rows)]
    return [dataclasses.replace(p, task_id=task_id, banned_ids=task.banned_ids()) for p in prompts]


def bench_methods(args, plan, device, clock, tokenizer):
    names = args.methods
    plain = compiled(PlainGPT2(build_backbone(args.size, device, args.dtype)), args).eval()
    backbone = backbone_parameter_count(plain)  # GPT-2's own 50,257 rows, no added ones
    batches = (1, plan.forward_batch)
    plain_prompts = {batch: method_prompts(tokenizer, batch, plan.mixed_context, -1) for batch in batches}
    for prompts in plain_prompts.values():
        timed_generation(plain, prompts, 2, clock)  # warm-up
    per_method = {}
    for name in progress_bar(names, desc="7 methods: decoding", leave=False):
        model = compiled(method_model(args.size, device, args.dtype, [name]), args)
        trained = sum(p.numel() for p in model.tasks[f"bench_{name}"].methods.parameters())
        model.export_methods()
        saved = sum(p.numel() for p in model.tasks[f"bench_{name}"].methods.parameters())
        entry = {"trainable_parameters": trained, "saved_parameters": saved,
                 "extra_pct": 100.0 * saved / backbone}
        for batch in batches:
            prompts = method_prompts(tokenizer, batch, plan.mixed_context, 0)
            timed_generation(model, prompts, 2, clock)
            # Plain GPT-2 timed in rounds with the method, so the machine's drift falls on both alike;
            # the fastest run of each counts.
            rounds = {"plain": [], "method": []}
            for _ in range(plan.repeats):
                rounds["plain"].append(timed_generation(plain, plain_prompts[batch], plan.max_length,
                                                        clock)["seconds"])
                rounds["method"].append(timed_generation(model, prompts, plan.max_length, clock)["seconds"])
            entry[f"decoding_seconds_batch{batch}"] = min(rounds["method"])
            entry[f"plain_decoding_seconds_batch{batch}"] = min(rounds["plain"])
            entry[f"decoding_overhead_batch{batch}"] = min(rounds["method"]) / min(rounds["plain"]) - 1.0
        per_method[name] = entry
        del model
    # Training: each method's process next to one of full fine-tuning (the order alternating), its
    # step-time ratio to that one, so drift between the first method and the last cancels.
    timing = {}
    for i, name in enumerate(progress_bar(names, desc="7 methods: training (one process each, beside full)",
                                          leave=False)):
        order = ["full", name] if i % 2 == 0 else [name, "full"]
        timing[name] = {mode: worker_run(mode, args, plan, device) for mode in order}
        method, full_step = (timing[name][name]["median_step_seconds"],
                             timing[name]["full"]["median_step_seconds"])
        per_method[name].update(step_time_ratio=method / full_step, median_step_seconds=method,
                                full_median_step_seconds=full_step)
    # Peak memory, the live bytes' (deterministic, see with_live_peak): full once, each method once.
    full = with_live_peak(timing[names[0]]["full"], "full", args, plan, device)
    for name in progress_bar(names, desc="7 methods: peak memory", leave=False):
        run = with_live_peak(timing[name][name], name, args, plan, device)
        per_method[name].update(peak_memory_ratio=run["peak_bytes"] / full["peak_bytes"],
                                peak_bytes=run["peak_bytes"])
    return {"backbone_parameters": backbone, "task": TRAIN_TASK, "decoding_tokens": plan.max_length,
            "decoding_batches": list(batches), "decoding_rounds": plan.repeats,
            "full_median_step_seconds": [m["full_median_step_seconds"] for m in per_method.values()],
            "full_peak_bytes": full["peak_bytes"],
            "memory": full["memory"],
            "methods": per_method}


# --- 8. one batch, six methods -------------------------------------------------------------------------
def bench_mixed_methods(args, plan, device, clock, tokenizer):
    model = compiled(method_model(args.size, device, args.dtype, MIXED_METHODS), args)
    model.export_methods()  # served form: plain prefixes, a prompt table row
    by_method = {name: method_prompts(tokenizer, plan.mixed_rows, plan.mixed_context, i)
                 for i, name in enumerate(MIXED_METHODS)}
    mixed = [p for prompts in by_method.values() for p in prompts]
    steps = plan.mixed_steps + 1
    options = DecodingOptions(max_length=steps, min_length=steps, no_sample=True)
    together = generate_batch(model, mixed, options)
    apart = [o for prompts in by_method.values() for o in generate_batch(model, prompts, options)]
    timed_generation(model, mixed, 2, clock)  # warm-up
    repeats = {"mixed": [], "separate": []}
    for _ in progress_bar(range(plan.mixed_repeats), desc="8 mixed methods", leave=False):  # interleaved
        repeats["mixed"].append(timed_generation(model, mixed, steps, clock))
        separate = [timed_generation(model, prompts, steps, clock) for prompts in by_method.values()]
        repeats["separate"].append({k: sum(r[k] for r in separate) for k in separate[0]})
    runs = {name: max(rs, key=lambda r: r["decode_tokens"] / r["decode_seconds"])
            for name, rs in repeats.items()}
    rate = {name: r["decode_tokens"] / r["decode_seconds"] for name, r in runs.items()}
    whole = {name: r["tokens"] / r["seconds"] for name, r in runs.items()}
    return {"methods": list(MIXED_METHODS), "rows_per_method": plan.mixed_rows,
            "context_tokens": plan.mixed_context, "decode_steps": plan.mixed_steps, "runs": runs,
            "decode_tokens_per_s": rate, "whole_tokens_per_s": whole,
            "mixed_vs_separate": rate["mixed"] / rate["separate"],
            "mixed_vs_separate_whole": whole["mixed"] / whole["separate"],
            "outputs_equal": sum(a == b for a, b in zip(together, apart)), "outputs_compared": len(apart)}


# --- 9. mixed LoRA: ours against HF PEFT's adapter_names --------------------------------------------
LORA_TASKS = 5


def peft_lora_twin(gpt2, model, names):
    """HF PEFT's LoRA with the same function as our tasks `names` (LoRA on q and v, rank r each):
    PEFT adapts GPT-2's fused c_attn as one projection, so each task is one LoRA of rank 2r there,
    A stacked [A_q; A_v] and B block-diagonal into q's and v's columns (the test of PEFT agreement
    uses the same mapping)."""
    import peft
    first = model.tasks[names[0]].methods["lora"]
    r, d = first.options["r"], first.shape.d_model
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=2 * r, lora_alpha=2 * first.options["alpha"],
                             target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    twin = peft.get_peft_model(gpt2, config, adapter_name=names[0])
    for name in names[1:]:
        twin.add_adapter(name, config)
    with torch.no_grad():
        for name in names:
            lora = model.tasks[name].methods["lora"]
            for layer, block in enumerate(twin.base_model.model.transformer.h):
                q, v = lora.pairs[f"{layer}_q"], lora.pairs[f"{layer}_v"]
                block.attn.c_attn.lora_A[name].weight.copy_(torch.cat([q.A, v.A]))
                b = torch.zeros_like(block.attn.c_attn.lora_B[name].weight)  # (3d, 2r)
                b[:d, :r], b[2 * d:, r:] = q.B, v.B
                block.attn.c_attn.lora_B[name].weight.copy_(b)
    twin.generation_config.eos_token_id = None  # exactly `steps` tokens per row, as ours
    return twin.eval()


def peft_generation(twin, prompts, names, steps, clock):
    """PEFT's generate over the same left-padded rows, each row naming its adapter."""
    width = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    types, mask = ids.clone(), torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        n = len(p.input_ids)
        ids[row, width - n:], types[row, width - n:] = (torch.tensor(p.input_ids),
                                                        torch.tensor(p.token_type_ids))
        mask[row, width - n:] = 1
    device = twin.device
    start = clock()
    with torch.no_grad():
        out = twin.generate(input_ids=ids.to(device), token_type_ids=types.to(device),
                            attention_mask=mask.to(device), adapter_names=names, max_new_tokens=steps,
                            min_new_tokens=steps, do_sample=False, pad_token_id=PAD_ID)
    seconds = clock() - start
    return {"seconds": seconds, "tokens": steps * len(prompts)}, out[:, width:].tolist()


def bench_mixed_lora(args, plan, device, clock, tokenizer):
    import warnings

    import peft

    from models.methods import lora as lora_module
    from models.methods import method_class
    from models.vlm import TaskSpec
    lora = method_class("lora").resolve({"dropout": 0.0})  # the paper's rank 4, alpha 32, q and v
    names = [f"bench_lora{i}" for i in range(LORA_TASKS)]
    backbone = build_backbone(args.size, device, args.dtype)
    reference = copy.deepcopy(backbone)
    model = perturbed(VersatileLM(backbone, [TaskSpec(n, i, (), {"lora": lora})
                                             for i, n in enumerate(names)]).eval(), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft_lora_twin(reference, model, names)
    # rows_per_task real E2E prompts for each task, every task its own prompts, no tokens banned
    prompts = task_prompts(TASKS["nlg"], E2E_200, tokenizer, LORA_TASKS * plan.mixed_rows)
    if len(prompts) < LORA_TASKS * plan.mixed_rows:
        raise VLMError(f"{E2E_200}: fewer than {LORA_TASKS * plan.mixed_rows} prompts")
    rows = [dataclasses.replace(keep_last(p, plan.mixed_context), task_id=i // plan.mixed_rows, banned_ids=(),
                                stop_ids=())
            for i, p in enumerate(prompts)]
    row_names = [names[p.task_id] for p in rows]
    steps = plan.mixed_steps + 1
    options = DecodingOptions(max_length=steps, min_length=steps, no_sample=True)

    def ours(routing):
        lora_module.ROUTING = routing
        try:
            start = clock()
            out = generate_batch(model, rows, options)
            return {"seconds": clock() - start, "tokens": sum(map(len, out))}, out
        finally:
            lora_module.ROUTING = "gather"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_generation(twin, rows[:2], row_names[:2], 2, clock)  # warm-up
        ours("gather")
        repeats, outputs = {"gather": [], "slice": [], "peft": []}, {}
        for _ in progress_bar(range(plan.mixed_repeats), desc="9 mixed LoRA", leave=False):  # interleaved
            for routing in ("gather", "slice"):
                run, outputs[routing] = ours(routing)
                repeats[routing].append(run)
            run, outputs["peft"] = peft_generation(twin, rows, row_names, steps, clock)
            repeats["peft"].append(run)
    rate = {name: max(r["tokens"] / r["seconds"] for r in rs) for name, rs in repeats.items()}
    return {"tasks": LORA_TASKS, "rows_per_task": plan.mixed_rows, "context_tokens": plan.mixed_context,
            "steps": steps, "lora": lora, "peft": peft.__version__, "tokens_per_s": rate,
            "ours_vs_peft": rate["gather"] / rate["peft"], "gather_vs_slice": rate["gather"] / rate["slice"],
            "same_tokens_as_peft": sum(a == b for a, b in zip(outputs["gather"], outputs["peft"])),
            "same_tokens_gather_slice": sum(a == b for a, b in zip(outputs["gather"], outputs["slice"])),
            "rows": len(rows)}


# --- report ---------------------------------------------------------------------------------------
def machine_info(device, args):
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "dtype": str(args.dtype).replace("torch.", ""), "compile": args.compile, "attention": "sdpa"}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else info["cpu"]
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, cwd=ROOT).stdout.strip()
    except OSError:
        pass
    return info


def targets(results):
    def entry(name, value, op, bound):
        met = value >= bound if op == ">=" else value <= bound
        return {"name": name, "value": round(value, 4), "target": f"{op} {bound}", "met": bool(met)}
    out = []
    if "decoding" in results:
        r = results["decoding"]
        out.append(entry("decoding: tokens/s, ours / original (batch 32, <=40 tokens)",
                         r["speedup"], ">=", 25))
        out.append(entry("decoding: greedy outputs equal to the original's (share)",
                         r["outputs_equal"] / r["outputs_compared"], ">=", 1.0))
    if "mixed" in results:
        r = results["mixed"]
        out.append(entry("mixed tasks: throughput, one 5x8 batch / 5 batches of 8",
                         r["mixed_vs_separate"], ">=", 2))
        out.append(entry("mixed tasks: per-row adapter choice overhead vs one task",
                         r["routing_overhead"], "<=", 0.15))
    if "training" in results:
        r = results["training"]
        out.append(entry("training: adapter / full fine-tuning step time", r["step_time_ratio"], "<=", 0.75))
        out.append(entry("training: adapter / full fine-tuning peak memory",
                         r["peak_memory_ratio"], "<=", 0.6))
    if "padding" in results:
        out.append(entry("padding: real-token share of our batches (lowest task)",
                         results["padding"]["min_ours_share"], ">=", 0.85))
    if "end_to_end" in results:
        r = results["end_to_end"]
        out.append(entry("end to end: evaluate.py on 200 E2E MRs, speedup over original decoding",
                         r["speedup"], ">=", 1))
        out.append(entry("end to end: evaluate.py outputs equal to the original's (share)",
                         r["outputs_equal"] / r["outputs_compared"], ">=", 1.0))
    if "mixed_methods" in results:
        r = results["mixed_methods"]
        out.append(entry("mixed methods: throughput, one 6x8 batch of six methods / 6 batches of 8",
                         r["mixed_vs_separate"], ">=", 2))
        out.append(entry("mixed methods: outputs equal to each method's own batch (share)",
                         r["outputs_equal"] / r["outputs_compared"], ">=", 1.0))
    if "mixed_lora" in results:
        r = results["mixed_lora"]
        out.append(entry(f"mixed LoRA: tokens/s, ours / HF PEFT adapter_names ({r['tasks']} tasks x "
                         f"{r['rows_per_task']} rows)",
                         r["ours_vs_peft"], ">=", 1.5))
        out.append(entry("mixed LoRA: same tokens as PEFT's (share)",
                         r["same_tokens_as_peft"] / r["rows"], ">=", 1.0))
    return out


def markdown(report):
    m, lines = report["machine"], []
    lines += [f"# vlm benchmarks ({report['size']}{', quick' if report['quick'] else ''})", "",
              f"Machine: {m.get('cpu')}, {m.get('cpu_count')} cores "
              f"({m.get('torch_threads')} torch threads), "
              f"{m.get('memory_gib', '?')} GiB; device {m['device']}"
              f"{' (' + m['gpu'] + ')' if 'gpu' in m else ''}, "
              f"{m['dtype']}; torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; "
              f"commit {m.get('commit', '?')}. Model: GPT-2 {report['size']} shape "
              f"({report['parameters'] / 1e6:.1f}M parameters, random weights). "
              f"Wall time {report['seconds']:.0f} s.", ""]
    if report["sections"] != report["requested_sections"]:
        lines += [f"Sections finished: {', '.join(report['sections'])} ({len(report['sections'])} of "
                  f"{len(report['requested_sections'])} asked for; the run was cut short or is still "
                  "running).", ""]
    lines += ["| target | value | goal | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['name']} | {t['value']:.4g} | {t['target']} | {'yes' if t['met'] else 'NO'} |")
    r = report["results"]
    if "decoding" in r:
        d = r["decoding"]
        lines += ["", "## 1. Decoding", "",
                  f"{d['prompts']} E2E prompts (mean {d['prompt_tokens_mean']:.0f} tokens), greedy, up to "
                  f"{d['max_length']} tokens.", "",
                  f"Interleaved rounds: ours on all {d['prompts']} prompts, then the original decoding on "
                  f"1/{d['ours_runs']} of them; the fastest round of each counts.", "",
                  "| method | round | tokens | seconds | tokens/s |", "|---|---|---|---|---|"]
        for name, runs in ((f"ours: batch {d['batch_size']}, KV cache", d["ours_rounds"]),
                           ("original: batch 1, no cache", d["baseline_rounds"])):
            lines += [f"| {name} | {i + 1} | {run['tokens']} | {run['seconds']:.2f} | "
                      f"{run['tokens'] / run['seconds']:.2f} |"
                      for i, run in enumerate(runs)]
        lines += ["", f"Speedup {d['speedup']:.1f}x (all rounds together {d['speedup_all_rounds']:.1f}x); "
                  f"outputs equal {d['outputs_equal']}/{d['outputs_compared']}."]
    if "mixed" in r:
        x = r["mixed"]
        lines += ["", "## 2. Mixed tasks", "",
                  f"{x['rows_per_task']} real prompts per task x {len(x['tasks'])} tasks, the last "
                  f"{x['context_tokens']} tokens of each; adapters of bottleneck {x['bottleneck']}; "
                  f"{x['decode_steps']} decoding steps timed "
                  "after the pass over the prompts (decoding tokens/s); whole = including that pass.", "",
                  "| batching | decoding tokens/s | whole tokens/s |", "|---|---|---|"]
        for name, label in (("mixed", "one batch of 40, five tasks"),
                            ("separate", "five batches of 8, one task each"),
                            ("single_task", f"one batch of 40, all {x['single_task']}")):
            lines.append(f"| {label} | {x['decode_tokens_per_s'][name]:.1f} | "
                         f"{x['whole_tokens_per_s'][name]:.1f} |")
        lines += ["", f"Mixed / separate: {x['mixed_vs_separate']:.2f}x decoding, "
                  f"{x['mixed_vs_separate_whole']:.2f}x whole; "
                  f"routing overhead {100 * x['routing_overhead']:+.1f}%."]
    if "adapter_overhead" in r:
        a = r["adapter_overhead"]
        lines += ["", "## 3. Adapter overhead (bottleneck 100)", "",
                  "| workload | plain GPT-2 s | with adapters s | overhead | LoRA paper |",
                  "|---|---|---|---|---|",
                  f"| forward, batch {a['forward_shape'][0]} x {a['forward_shape'][1]} | "
                  f"{a['forward_seconds']['plain']:.3f} | {a['forward_seconds']['adapters']:.3f} | "
                  f"{100 * a['forward_overhead']:+.1f}% | +2.2% |",
                  f"| decoding, batch 1, {a['decoding_tokens']} tokens | "
                  f"{a['decoding_seconds']['plain']:.3f} | {a['decoding_seconds']['adapters']:.3f} | "
                  f"{100 * a['decoding_overhead']:+.1f}% | +20.7% |"]
    if "training" in r:
        t = r["training"]
        gib = lambda b: b / 2 ** 30  # noqa: E731
        lines += ["", f"## 4. Training ({t['task']}, batch {t['batch_size']}, {t['steps']} steps, "
                  "one process per mode)", "",
                  "| mode | trainable parameters | median step s (runs) | peak memory GiB "
                  "| above loaded model GiB | peaks of the timing runs GiB |",
                  "|---|---|---|---|---|---|"]
        for mode in ("full", "adapter"):
            run = t["runs"][mode]
            steps = ", ".join(f"{s:.3f}" for s in run["all_median_step_seconds"])
            peaks = ", ".join(f"{gib(b):.2f}" for b in run["timing_runs_peak_bytes"])
            lines.append(f"| {mode} | {run['trainable_parameters']:,} | {run['median_step_seconds']:.3f} "
                         f"({steps}) | {gib(run['peak_bytes']):.2f} | "
                         f"{gib(run['peak_bytes'] - run['loaded_bytes']):.2f} | {peaks} |")
        lines += ["", f"Adapter / full: step time {t['step_time_ratio']:.2f} (fastest run of each), "
                  f"peak memory {t['peak_memory_ratio']:.2f} "
                  f"({t['memory_above_loaded_ratio']:.2f} above the loaded model). "
                  f"Memory: {t['runs']['full']['memory']}"
                  + ("; the timing runs keep glibc's default allocator, whose peaks vary from run to run."
                     if t["runs"]["full"]["memory"] == LIVE_BYTES_MEMORY else ".")]
    if "padding" in r:
        lines += ["", "## 5. Padding of training batches (adapter training, task batch sizes)", "",
                  "| task | examples | batch | real-token share ours | original | real tokens/s ours "
                  "| original | speedup |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, p in r["padding"]["tasks"].items():
            lines.append(f"| {name} | {p['examples']} | {p['batch_size']} | {p['ours_share']:.3f} | "
                         f"{p['original_share']:.3f} | {p['ours_real_tokens_per_s']:.0f} | "
                         f"{p['original_real_tokens_per_s']:.0f} | {p['speedup']:.2f}x |")
    if "end_to_end" in r:
        e = r["end_to_end"]
        lines += ["", "## 6. evaluate.py end to end", "",
                  f"{e['mrs']} E2E dev MRs, greedy, up to {e['max_length']} tokens. evaluate.py: "
                  f"{e['ours_wall_seconds']:.1f} s wall ({e['ours_includes']}). Original decoding: "
                  f"{e['baseline_seconds']:.1f} s for {e['baseline_mrs_decoded']} MRs, "
                  f"{e['baseline_estimated_seconds']:.0f} s estimated for all "
                  f"{e['mrs']} (decoding only). Speedup {e['speedup']:.1f}x; outputs equal "
                  f"{e['outputs_equal']}/{e['outputs_compared']}."]
    if "methods" in r:
        x = r["methods"]
        b1, bn = x["decoding_batches"]
        lines += ["", f"## 7. Per-task methods (paper defaults; training: {x['task']}, one process each, "
                  f"ratios to full fine-tuning on the same batches in a process run beside it; decoding: "
                  f"{x['decoding_tokens']} tokens per row, ratios to plain GPT-2 timed in the same rounds, "
                  f"the fastest of {x['decoding_rounds']})", "",
                  "| method | trainable | saved | extra parameters % | step time / full | "
                  f"peak memory / full | decoding overhead, batch {b1} | batch {bn} |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in x["methods"].items():
            lines.append(f"| {name} | {m['trainable_parameters']:,} | {m['saved_parameters']:,} | "
                         f"{m['extra_pct']:.3g} | {m['step_time_ratio']:.2f} | "
                         f"{m['peak_memory_ratio']:.2f} | "
                         f"{100 * m[f'decoding_overhead_batch{b1}']:+.1f}% | "
                         f"{100 * m[f'decoding_overhead_batch{bn}']:+.1f}% |")
        lines += ["", f"Peak memory: {x['memory']}."]
    if "mixed_methods" in r:
        x = r["mixed_methods"]
        lines += ["", "## 8. One batch, six methods", "",
                  f"{x['rows_per_method']} E2E prompts per method ({', '.join(x['methods'])}), the last "
                  f"{x['context_tokens']} tokens each, {x['decode_steps']} decoding steps timed after the "
                  "prompt pass.", "",
                  "| batching | decoding tokens/s | whole tokens/s |", "|---|---|---|",
                  f"| one batch of {x['rows_per_method'] * len(x['methods'])}, six methods | "
                  f"{x['decode_tokens_per_s']['mixed']:.1f} | {x['whole_tokens_per_s']['mixed']:.1f} |",
                  f"| six batches of {x['rows_per_method']}, one method each | "
                  f"{x['decode_tokens_per_s']['separate']:.1f} | {x['whole_tokens_per_s']['separate']:.1f} |",
                  "", f"Mixed / separate: {x['mixed_vs_separate']:.2f}x decoding, "
                  f"{x['mixed_vs_separate_whole']:.2f}x whole; "
                  f"outputs equal {x['outputs_equal']}/{x['outputs_compared']}."]
    if "mixed_lora" in r:
        x = r["mixed_lora"]
        t = x["tokens_per_s"]
        lines += ["", f"## 9. Mixed LoRA against HF PEFT {x['peft']}", "",
                  f"{x['tasks']} LoRA tasks (rank {x['lora']['r']}, alpha {x['lora']['alpha']:g}, "
                  f"{' and '.join(x['lora']['targets'])}) x {x['rows_per_task']} E2E prompts each in one "
                  f"batch, the last {x['context_tokens']} tokens of each, {x['steps']} greedy tokens per "
                  "row, the same weights; tokens/s of the whole call.", "",
                  "| implementation | tokens/s |", "|---|---|",
                  f"| ours, batched gathers of each row's LoRA (default) | {t['gather']:.1f} |",
                  f"| ours, one sub-batch per task in every projection | {t['slice']:.1f} |",
                  f"| HF PEFT, `generate(adapter_names=...)` | {t['peft']:.1f} |",
                  "", f"Ours / PEFT {x['ours_vs_peft']:.2f}x; gather / slice {x['gather_vs_slice']:.2f}x; "
                  f"same tokens as PEFT {x['same_tokens_as_peft']}/{x['rows']}, "
                  f"gather as slice {x['same_tokens_gather_slice']}/{x['rows']}."]
    return "\n".join(lines) + "\n"


SECTIONS = {"decoding": bench_decoding, "mixed": bench_mixed, "adapter_overhead": bench_adapter_overhead,
            "training": bench_training, "padding": bench_padding, "end_to_end": bench_end_to_end,
            "methods": bench_methods, "mixed_methods": bench_mixed_methods, "mixed_lora": bench_mixed_lora}


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="GPT-2 shape (random weights)")
    parser.add_argument("--quick", action="store_true", help="fewer prompts, repeats and baseline runs")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="inference dtype (sections 1-3, 6); training stays float32")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the GPT-2 forward (sections 1-3)")
    parser.add_argument("--compile_mode", default=None,
                        help="torch.compile mode, e.g. reduce-overhead (CUDA graphs on GPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "bench"), help="where results.json/.md go")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods of section 7 (default: every registered method)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # full, or a method name
    parser.add_argument("--steps", type=int, default=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise VLMError(f"--device {args.device}: CUDA is not available on this machine")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise VLMError(f"--device {args.device}: use cpu, cuda or cuda:N")
    from models.methods import METHODS, parse_method_spec
    args.methods = [m for m in (args.methods or ",".join(METHODS)).split(",") if m]
    for name in args.methods:
        parse_method_spec(name, "--methods")
    if not args.methods:
        raise VLMError("--methods: name at least one method")
    args.dtype = getattr(torch, args.dtype)
    if args.dtype != torch.float32 and args.device == "cpu":
        raise VLMError(f"--dtype {args.dtype}: half precision is for --device cuda")
    return args


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return train_worker(args)
    device, plan = torch.device(args.device), QUICK if args.quick else Plan()
    clock, tokenizer = Clock(device), load_tokenizer()
    started, results = time.perf_counter(), {}
    with torch.device("meta"):  # shapes only: no weights allocated to count parameters
        shape = GPT2LMHeadModel(GPT2Config(**SIZES[args.size], n_positions=1024))
        add_special_token_rows(shape)
    parameters = sum(p.numel() for p in shape.parameters())
    os.makedirs(args.output_dir, exist_ok=True)
    for name in progress_bar(args.sections, desc="bench", unit="section"):
        results[name] = SECTIONS[name](args, plan, device, clock, tokenizer)
        # rewritten after every section, so a run cut short keeps the sections it finished
        text = write_report(args, plan, device, started, parameters, results)
    print(text)
    print(f"wrote {os.path.join(args.output_dir, 'results.json')} and results.md")


def write_report(args, plan, device, started, parameters, results):
    """results.json and results.md (each written whole, then renamed in) for the sections so far;
    returns the markdown."""
    report = {"size": args.size, "quick": args.quick, "parameters": parameters,
              "plan": dataclasses.asdict(plan),
              "machine": machine_info(device, args), "seconds": time.perf_counter() - started,
              "sections": list(results), "requested_sections": list(args.sections),
              "targets": targets(results),
              "results": results}
    write_json(os.path.join(args.output_dir, "results.json"), report)
    text = markdown(report)
    write_text(os.path.join(args.output_dir, "results.md"), text)
    return text


if __name__ == "__main__":
    main()
