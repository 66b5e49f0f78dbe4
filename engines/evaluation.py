"""Evaluation shared by evaluate.py, evaluate_vlm.py and the studies: decode a task's evaluation
split, write the files its official scorers read and score it. What a task's prompts, references,
files and metrics are is the task's own business (tasks/); this module only runs them."""
import math
import os

import torch

from engines.generate import generate, virtual_token_count
from utils.data import collate, with_virtual_tokens
from utils.io import write_json


@torch.inference_mode()
def teacher_forced_nll(model, task, records, max_history, task_id, batch_size, max_positions):
    """Token-level mean NLL of the gold replies (for dialogue perplexity), under the distribution
    decoding draws from: the tokens the task never generates (other tasks' special tokens, `<pad>`)
    are left out of the softmax, so a combined model and the task's own checkpoint score alike."""
    n_virtual = virtual_token_count(model, task_id)
    examples = task.training_examples(records, max_history, max_positions=max_positions - n_virtual,
                                      where=task.name)
    if n_virtual:
        examples = [with_virtual_tokens(e, n_virtual) for e in examples]
    banned = list(task.banned_ids())
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start:start + batch_size]], task_id)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        extra = {"virtual_ids": batch["virtual_ids"]} if "virtual_ids" in batch else {}
        logits = model(batch["input_ids"], token_type_ids=batch["token_type_ids"],
                       task_ids=batch["task_ids"] if task_id >= 0 else None, use_cache=False, **extra).logits
        logits = logits[:, :-1].float()
        logits[..., banned] = -float("inf")  # a gold label is never banned: its own task's token or text
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                 ignore_index=-100, reduction="sum")
        total += loss.item()
        count += (labels != -100).sum().item()
    return total / max(count, 1)


def score_and_write(task, prompts, outputs, output_dir, extra=None):
    """The task's metrics and files, plus `<task>_metrics.json`. outputs: decoded strings, one per prompt."""
    os.makedirs(output_dir, exist_ok=True)
    task.write_outputs(prompts, outputs, output_dir)
    result = {"task": task.name, "examples": len(prompts)}
    result.update(task.score(outputs, prompts))
    result.update(extra or {})
    write_json(os.path.join(output_dir, f"{task.name}_metrics.json"), result)
    return result


def evaluation_records(task, dataset_path, tokenizer, dataset_cache=None):
    """The records of a task's evaluation split (the split evaluate.py decodes)."""
    return task.load_data(dataset_path, tokenizer, [task.test_split], dataset_cache)[task.test_split]


def finish_task(model, tokenizer, task, records, prompts, generated, task_id, max_history, batch_size=32,
                output_dir="results", cleanup=True):
    """Decoded ids -> text, plus the teacher-forced perplexity for tasks that report it (dialogue);
    scores and writes the task's files and returns its metrics. `max_history`: as resolved for prompts."""
    outputs = [task.output_text(tokenizer, ids, cleanup) for ids in generated]
    extra = {}
    if task.teacher_forced:
        nll = teacher_forced_nll(model, task, records, max_history, task_id, batch_size,
                                 model.config.n_positions)
        extra = {"nll": nll, "ppl": math.exp(nll)}
    return score_and_write(task, prompts, outputs, output_dir, extra)


def evaluate_task(model, tokenizer, task, dataset_path, options, task_id, max_history=None,
                  batch_size=32, output_dir="results", dataset_cache=None, cleanup=True, progress=True,
                  shots=0):
    """Decode a task's evaluation split, score it and write the files; returns the metrics.
    shots (user tasks): that many solved training examples in front of every prompt."""
    max_history = task.max_history if max_history is None else max_history
    records = evaluation_records(task, dataset_path, tokenizer, dataset_cache)
    prompts = task.dataset_prompts(records, max_history, tokenizer, task_id,
                                   task.shot_ids(dataset_path, tokenizer, shots, options.seed))
    generated = generate(model, prompts, options, batch_size=batch_size, progress=progress, desc=task.name)
    return finish_task(model, tokenizer, task, records, prompts, generated, task_id, max_history, batch_size,
                       output_dir, cleanup)


def format_metrics(result):
    return "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
