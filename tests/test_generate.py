"""Batched cached decoding gives exactly the tokens of one-at-a-time uncached decoding."""
import random

import pytest
import torch
from conftest import tiny_gpt2

from engines.generate import DecodingOptions, Prompt, filter_logits, generate, generate_uncached
from engines.specs import adapter_specs
from models.vlm import VersatileLM, add_special_token_rows
from tasks.table import TASKS


@pytest.fixture(scope="module")
def model():
    gpt2 = tiny_gpt2(seed=3)
    add_special_token_rows(gpt2)
    vlm = VersatileLM(gpt2, adapter_specs({"mt": 16, "nlg": 8, "dialogue": 8}))
    with torch.no_grad():  # make each task's eos likely enough that some rows stop early
        for name in ("mt", "nlg", "dialogue"):
            gpt2.transformer.wte.weight[TASKS[name].token_ids()[1]] *= 40
    return vlm.eval()


def task_prompt(task_name, rng, task_id=None):
    task = TASKS[task_name]
    words = lambda n: [rng.randrange(50257) for _ in range(n)]  # noqa: E731
    if task_name in ("mt", "summarization"):
        context = words(rng.randrange(2, 30))
    elif task_name == "nlg":
        context = [("name", words(2)), ("food", words(rng.randrange(1, 5)))]
    else:
        context = ([words(3), words(4)], [words(rng.randrange(1, 8)) for _ in range(rng.randrange(1, 4))])
    example = task.build_inputs(context, [], with_eos=False)
    return Prompt(example["input_ids"], example["token_type_ids"],
                  task.task_id if task_id is None else task_id, tuple(task.token_ids()))


def prompts_for(names, count, seed=0):
    rng = random.Random(seed)
    return [task_prompt(names[i % len(names)], rng) for i in range(count)]


def reference(model, prompts, options):
    return [generate_uncached(model, p, options) for p in prompts]


def test_greedy_batched_equals_uncached_single_task(model):
    prompts = prompts_for(["mt"], 9)
    options = DecodingOptions(max_length=25, no_sample=True)
    batched = generate(model, prompts, options, batch_size=4, progress=False)
    assert batched == reference(model, prompts, options)
    lengths = {len(x) for x in batched}
    assert len(lengths) > 1  # some rows stopped early at a special token, others ran to max_length
    assert max(lengths) == 25


def test_greedy_batched_equals_uncached_for_a_batch_mixing_tasks(model):
    prompts = prompts_for(["mt", "nlg", "dialogue"], 12, seed=1)
    prompts.append(task_prompt("mt", random.Random(5), task_id=-1))  # a plain GPT-2 row too
    options = DecodingOptions(max_length=20, no_sample=True)
    batched = generate(model, prompts, options, batch_size=13, progress=False)
    assert batched == reference(model, prompts, options)


def test_sampling_is_the_same_whatever_the_batch(model):
    prompts = prompts_for(["mt", "nlg"], 6, seed=2)
    options = DecodingOptions(max_length=15, no_sample=False, temperature=0.7, top_k=50, top_p=0.9, seed=7)
    together = generate(model, prompts, options, batch_size=6, progress=False)
    in_pairs = generate(model, prompts, options, batch_size=2, progress=False)
    assert together == in_pairs == reference(model, prompts, options)
    greedy = generate(model, prompts, DecodingOptions(max_length=15, no_sample=True), progress=False)
    assert together != greedy


def test_stops_at_task_tokens_and_honours_min_length(model):
    prompts = prompts_for(["mt", "nlg"], 8, seed=4)
    short = generate(model, prompts, DecodingOptions(max_length=30, no_sample=True), progress=False)
    for prompt, out in zip(prompts, short):
        assert not set(out) & set(prompt.stop_ids)
    assert min(len(x) for x in short) < 6
    options = DecodingOptions(max_length=30, min_length=6, no_sample=True)
    longer = generate(model, prompts, options, progress=False)
    assert min(len(x) for x in longer) >= 6
    assert longer == reference(model, prompts, options)


def test_banned_tokens_are_never_generated(model):
    prompts = prompts_for(["mt"], 4, seed=6)
    free = generate(model, prompts, DecodingOptions(max_length=10, no_sample=True), progress=False)
    banned = sorted({t for out in free for t in out})
    for p in prompts:
        p.banned_ids = tuple(banned)
    constrained = generate(model, prompts, DecodingOptions(max_length=10, no_sample=True), progress=False)
    assert not {t for out in constrained for t in out} & set(banned)


def test_filter_logits_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, top_k=2)
    assert torch.isinf(kept[0, 2:]).all() and torch.isfinite(kept[0, :2]).all()
    # cumulative 0.5, 0.8, 0.95, 1.0: top_p=0.7 keeps the first token above 0.7, i.e. two tokens
    kept = filter_logits(logits, top_p=0.7)
    assert torch.isfinite(kept[0, :2]).all() and torch.isinf(kept[0, 2:]).all()
