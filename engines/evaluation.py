"""Evaluation shared by evaluate.py and evaluate_vlm.py: prompts from a dataset split, decoding,
the output and reference files the authors wrote, and each task's metrics."""
import json
import math
import os
import random
import re

import torch

from utils import metrics
from utils.data import build_inputs, collate, iter_contexts, load_task_data, training_examples
from engines.generate import Prompt, generate
from utils.io import write_json, write_lines
from utils.errors import VLMError
from utils.tasks import banned_token_ids, task_token_ids
from utils.templates import NO_SEGMENT, cut_at_stop
from utils.templates import stop_ids as template_stop_ids


def clean_up_tokenization(text):
    """The space clean-up pytorch-transformers 1.2 applied in decode(), which the authors' scores
    include (transformers 5 no longer does it for GPT-2)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


def decode_text(tokenizer, ids, cleanup=True):
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return clean_up_tokenization(text) if cleanup else text


def task_output(task, tokenizer, ids, cleanup=True):
    """The text of a decoded reply: a user task's answer is cut at its stop rule and not cleaned."""
    if task.layout == "template":
        return cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), task)
    return decode_text(tokenizer, ids, cleanup)


def mr_key(slots):
    """A meaning representation as text, in the E2E style: `name[The Vaults], eatType[pub]`."""
    return ", ".join(f"{slot}[{value}]" for slot, value in slots)


def make_prompt(task, context, task_id, meta=None):
    """The decoding prompt of one example: its input with an empty reply; the task's special
    tokens stop it and other tasks' special tokens are never generated."""
    example = build_inputs(task, context, [], with_eos=False)
    return Prompt(example["input_ids"], example["token_type_ids"], task_id, tuple(task_token_ids(task)),
                  banned_token_ids(task), dict(meta or {}))


def template_prompt(task, item, task_id, shots=()):
    """The decoding prompt of one record of a user task (utils.templates.template_item), with the
    token ids of `shots` solved examples in front (--shots k, utils.templates.few_shot_text)."""
    prompt = item["prompt"]
    shots = list(shots)
    return Prompt(shots + prompt["input_ids"], [NO_SEGMENT] * len(shots) + prompt["token_type_ids"], task_id,
                  template_stop_ids(task), banned_token_ids(task),
                  {"reference": item["answer"], "where": item["where"], "record": item["record"]},
                  virtual_ids=[-1] * len(shots) + prompt["virtual_ids"], max_length=task.max_answer_tokens)


def dataset_prompts(task, records, max_history, tokenizer, task_id, shots=()):
    """One prompt per example of an evaluation split (per unique MR for nlg), with its reference.

    As the authors' evaluate.py: sources cut, targets whole, persona not rotated. A user task's
    prompts are its template's, each with `shots` (token ids of solved examples) in front."""
    if task.layout == "template":
        return [template_prompt(task, item, task_id, shots) for item in records]
    prompts, by_mr = [], {}
    for context, target, record, utterance in iter_contexts(task, records, max_history,
                                                            rotate_persona=False, for_training=False):
        reference = decode_text(tokenizer, target)
        if task.layout == "nlg":
            key = mr_key((slot, tokenizer.decode(value)) for slot, value in context)
            if key in by_mr:  # E2E: all references of one MR belong to one output
                by_mr[key].meta["references"].append(reference)
                continue
            prompt = make_prompt(task, context, task_id, {"mr": key, "references": [reference]})
            by_mr[key] = prompt
        else:
            meta = {"reference": reference}
            if task.name == "qa":
                meta.update(id=record["id"], turn_id=utterance.get("turn_id"))
            elif task.name == "dialogue":
                meta["persona"] = [decode_text(tokenizer, p) for p in context[0]]
            prompt = make_prompt(task, context, task_id, meta)
        prompts.append(prompt)
    return prompts


@torch.inference_mode()
def teacher_forced_nll(model, task, records, max_history, task_id, batch_size, max_positions):
    """Token-level mean NLL of the gold replies (for dialogue perplexity), under the distribution
    decoding draws from: the tokens the task never generates (other tasks' special tokens, `<pad>`)
    are left out of the softmax, so a combined model and the task's own checkpoint score alike."""
    from engines.generate import virtual_token_count
    from utils.data import with_virtual_tokens
    n_virtual = virtual_token_count(model, task_id)
    examples = training_examples(task, records, max_history, max_positions=max_positions - n_virtual, where=task.name)
    if n_virtual:
        examples = [with_virtual_tokens(e, n_virtual) for e in examples]
    banned = list(banned_token_ids(task))
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


def _references(prompts):
    return [p.meta["reference"] for p in prompts]


def _coqa(outputs, prompts):
    predictions = [{"id": p.meta["id"], "turn_id": p.meta["turn_id"], "answer": out} for p, out in zip(prompts, outputs)]
    gold = {(p.meta["id"], p.meta["turn_id"]): [p.meta["reference"]] for p in prompts}
    return metrics.coqa_scores(predictions, gold)


# Metric name in the task table -> scorer(outputs, prompts) -> {name: value}.
SCORERS = {
    "bleu": lambda outputs, prompts: {"bleu": metrics.moses_bleu(outputs, _references(prompts))},
    "sacrebleu": lambda outputs, prompts: {"sacrebleu": metrics.sacre_bleu(outputs, _references(prompts))},
    "rouge": lambda outputs, prompts: metrics.rouge_scores(outputs, _references(prompts)),
    "f1": lambda outputs, prompts: {"f1": metrics.unigram_f1(outputs, _references(prompts))},
    "coqa": _coqa,
    "e2e": lambda outputs, prompts: metrics.e2e_scores(outputs, [p.meta["references"] for p in prompts]),
}


def template_scores(task, outputs, references):
    """A user task's metric (its task file's `metric`), on the answers cut at its stop rule."""
    if task.metric == "accuracy":
        return {"accuracy": metrics.label_accuracy(outputs, references, task.label_map)}
    if task.metric == "intent_slot":
        return metrics.intent_slot_scores(outputs, references)
    if task.metric == "exact_match":
        return {"exact_match": metrics.exact_match(outputs, references)}
    if task.metric == "token_f1":
        return {"token_f1": metrics.token_f1(outputs, references)}
    if task.metric == "bleu":
        return {"bleu": metrics.moses_bleu(outputs, references)}
    return metrics.rouge_scores(outputs, references)


def one_line(text):
    """An answer on one line of `<task>_output.txt`: newlines (and backslashes) escaped as in JSON."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def write_outputs(task, prompts, outputs, output_dir):
    """The files the authors wrote (`<task>_output.txt`, `<task>_ref.txt`, ...), in the formats the
    official scorers read. A user task: `<task>_output.txt` and `<task>_ref.txt` (one answer a
    line, newlines escaped as \\n) and `<task>_predictions.jsonl` (record, prediction, reference)."""
    path = lambda name: os.path.join(output_dir, f"{task.name}_{name}")  # noqa: E731
    if task.layout == "template":
        write_lines(path("output.txt"), [one_line(o) for o in outputs])
        write_lines(path("ref.txt"), [one_line(p.meta["reference"]) for p in prompts])
        write_lines(path("predictions.jsonl"), [json.dumps({"where": p.meta["where"], "record": p.meta["record"],
                                                           "prediction": o, "reference": p.meta["reference"]},
                                                          ensure_ascii=False) for p, o in zip(prompts, outputs)])
        return
    if task.name == "qa":
        predictions = [{"id": p.meta["id"], "turn_id": p.meta["turn_id"], "answer": out}
                       for p, out in zip(prompts, outputs)]
        write_json(path("output.txt"), predictions, indent=None)  # the authors' name for it
        write_json(path("predictions.json"), predictions)         # for the official CoQA scorer
        return
    write_lines(path("output.txt"), outputs)
    if task.layout == "nlg":
        # The official E2E scorer's multi-reference format: one block per MR, a blank line between.
        blocks = [p.meta["references"] for p in prompts]
        write_lines(path("ref.txt"), [line for refs in blocks for line in refs + [""]][:-1])
        write_lines(path("mr.txt"), [p.meta["mr"] for p in prompts])
    else:
        write_lines(path("ref.txt"), _references(prompts))
    if task.name == "dialogue":
        write_lines(path("persona.txt"), ["\t".join(p.meta["persona"]) for p in prompts])


def score_and_write(task, prompts, outputs, output_dir, extra=None):
    """The task's metrics (from the task table) and files, plus `<task>_metrics.json`.
    outputs: decoded strings, one per prompt."""
    os.makedirs(output_dir, exist_ok=True)
    write_outputs(task, prompts, outputs, output_dir)
    result = {"task": task.name, "examples": len(prompts)}
    if task.layout == "template":
        result.update(template_scores(task, outputs, _references(prompts)))
    else:
        for name in task.metrics:
            if name in SCORERS:
                result.update(SCORERS[name](outputs, prompts))
    result.update(extra or {})
    write_json(os.path.join(output_dir, f"{task.name}_metrics.json"), result)
    return result


def evaluation_records(task, dataset_path, tokenizer, dataset_cache=None):
    """The records of a task's evaluation split (the split evaluate.py decodes)."""
    return load_task_data(task, dataset_path, tokenizer, [task.test_split], dataset_cache)[task.test_split]


def finish_task(model, tokenizer, task, records, prompts, generated, task_id, max_history, batch_size=32,
                output_dir="results", cleanup=True):
    """Decoded ids -> text, plus the teacher-forced perplexity for tasks that report it (dialogue);
    scores and writes the task's files and returns its metrics. `max_history`: as resolved for prompts."""
    outputs = [task_output(task, tokenizer, ids, cleanup) for ids in generated]
    extra = {}
    if "ppl" in task.metrics:
        nll = teacher_forced_nll(model, task, records, max_history, task_id, batch_size,
                                 model.config.n_positions)
        extra = {"nll": nll, "ppl": math.exp(nll)}
    return score_and_write(task, prompts, outputs, output_dir, extra)


def shot_ids(task, dataset_path, tokenizer, shots, seed):
    """Token ids of `shots` solved training examples of a user task (--shots k), drawn with the seed."""
    if not shots:
        return []
    if task.layout != "template":
        raise VLMError(f"--shots {shots}: few-shot prompting is for user tasks (--task_file); {task.name} is built in")
    train = load_task_data(task, dataset_path, tokenizer, ["train"])["train"]
    if shots > len(train):
        raise VLMError(f"--shots {shots}: the train split of {dataset_path} has {len(train)} records")
    from utils.templates import few_shot_text
    chosen = random.Random(seed).sample(train, shots)
    return few_shot_text(task, [item["record"] for item in chosen], tokenizer)


def evaluate_task(model, tokenizer, task, dataset_path, options, task_id, max_history=None,
                  batch_size=32, output_dir="results", dataset_cache=None, cleanup=True, progress=True, shots=0):
    """Decode a task's evaluation split, score it and write the files; returns the metrics.
    shots (user tasks): that many solved training examples in front of every prompt."""
    max_history = task.max_history if max_history is None else max_history
    records = evaluation_records(task, dataset_path, tokenizer, dataset_cache)
    prompts = dataset_prompts(task, records, max_history, tokenizer, task_id,
                              shot_ids(task, dataset_path, tokenizer, shots, options.seed))
    generated = generate(model, prompts, options, batch_size=batch_size, progress=progress, desc=task.name)
    return finish_task(model, tokenizer, task, records, prompts, generated, task_id, max_history, batch_size,
                       output_dir, cleanup)


def format_metrics(result):
    return "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())



MR_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*")
MR_TEXT = re.compile(rf"{MR_SLOT.pattern}(?:,{MR_SLOT.pattern})*")


def parse_mr(text, task, where):
    """`name[The Vaults], eatType[pub]` -> [(slot, value)] in order."""
    if not MR_TEXT.fullmatch(text):
        raise VLMError(f"{where}: cannot read a meaning representation like 'name[X], eatType[pub]'")
    slots = [(m.group(1), m.group(2)) for m in MR_SLOT.finditer(text)]
    for slot, _ in slots:
        if slot not in task.slot_tokens:
            raise VLMError(f"{where}: unknown NLG slot {slot!r} (known: {', '.join(task.slot_tokens)})")
    return slots


def user_prompt(task, item, tokenizer, max_history, task_id, where):
    """A prompt from a user's own input: a string, or a JSON object with the task's fields
    (mt/summarization {"src"}; nlg {"src": {slot: value}} or an MR string; dialogue
    {"personality": [...], "history": [...]}; qa {"document", "history"})."""
    if task.layout == "template":
        inputs = [f for f in task.fields if f != task.answer_field]
        if isinstance(item, str):
            if len(inputs) != 1:
                raise VLMError(f"{where}: task {task.name} has the fields {', '.join(inputs)}: give a JSON object")
            item = {inputs[0]: item}
        if not isinstance(item, dict):
            raise VLMError(f"{where}: expected a string or a JSON object with the fields {', '.join(inputs)}")
        from utils.templates import template_item
        record = {field: item.get(field) for field in inputs}
        for field, value in record.items():
            if not isinstance(value, str):
                raise VLMError(f"{where}: task {task.name}: field {field!r} must be a string")
        return template_prompt(task, template_item(task, dict(record, taskname=task.name), where, tokenizer,
                                                   require_answer=False), task_id)

    def encode(text):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON \\u escape: no tokenizer takes it
            raise VLMError(f"{where}: {text[:40]!r} is not valid Unicode text") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if isinstance(item, str):
        item = ({"src": item} if task.layout in ("seq2seq", "nlg") else
                {"history": [item]} if task.name == "dialogue" else None)
        if item is None:
            raise VLMError(f"{where}: qa needs a JSON object with 'document' and 'history'")
    if not isinstance(item, dict):
        raise VLMError(f"{where}: expected a string or a JSON object")

    def field(key, kind):
        value = item.get(key)
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
            raise VLMError(f"{where}: {key!r} must be a {'list of strings' if kind is list else kind.__name__}")
        return value

    if task.layout == "seq2seq":
        source = encode(field("src", str))
        context = source[:task.max_source_tokens] if task.max_source_tokens else source
    elif task.layout == "nlg":
        src = item.get("src")
        slots = parse_mr(src, task, where) if isinstance(src, str) else list(field("src", dict).items())
        for slot, value in slots:
            if slot not in task.slot_tokens or not isinstance(value, str):
                raise VLMError(f"{where}: bad NLG slot {slot!r}")
        context = [(slot, encode(value)) for slot, value in slots]
    else:
        history = [encode(t) for t in field("history", list)][-(2 * max_history + 1):]
        if task.name == "qa":
            persona = [encode(field("document", str))[:task.max_source_tokens]]
        else:
            persona = [encode(p) for p in field("personality", list)] if "personality" in item else []
        context = (persona, history)
    return make_prompt(task, context, task_id, {"input": where})  # `where` names it in decoding errors
