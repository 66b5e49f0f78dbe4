"""Why p-tuning scores 0 on the stand-in: our runs next to HF PEFT's on the same backbone, data and
schedule, scored without decoding.

    python results/mini/prompt_study/diagnosis.py     # after: bash run.sh --mini --stages user_tasks

Scores on the sentiment valid split (56 records): the mean NLL of the answer's label token and of
the <|endoftext|> after it; the share of records whose gold label is the likeliest of the three
labels (ranked by the label token, no decoding: 0.464 is always "neutral"); the most common greedy
first answer tokens. Rows:
- zero-shot: the stand-in with the template's text and no virtual tokens;
- ours: the study's checkpoints trained on all 215 records (runs/mini/prompt_study/train/);
- PEFT 0.21.2, trained here with the study's settings: p-tuning (PromptEncoder, LSTM, 10 tokens,
  hidden 128) at lr 1e-2 and prompt tuning (10 tokens, PEFT's random init) at lr 0.3; AdamW without
  weight decay, batches of 8, 10 epochs, rate decayed linearly to 0, gradients clipped to 1.0,
  loss on the answer tokens only.
Writes diagnosis.md next to this file.
"""
import collections
import json
import math
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402

from models.checkpoint import load_checkpoint  # noqa: E402
from tasks.task_file import load_task_file  # noqa: E402
from tasks.template import build_template_example, without_virtual_positions  # noqa: E402
from utils.data import collate, load_tokenizer  # noqa: E402
from utils.io import write_text  # noqa: E402

BACKBONE = os.path.join(ROOT, "data", "gpt2-stand-in")
DATA = os.path.join(ROOT, "data", "samples", "sentiment")
RUNS = os.path.join(ROOT, "runs", "mini", "prompt_study", "train")
LABELS = ["positive", "negative", "neutral"]
TASK = load_task_file(os.path.join(ROOT, "data", "tasks", "nemo_article.json"))["sentiment"]
TOKENIZER = load_tokenizer(BACKBONE)


def records(split):
    with open(os.path.join(DATA, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def example(record, virtual):
    built = build_template_example(TASK, record, TOKENIZER)
    return built if virtual else without_virtual_positions(built)


def padded(examples):
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [50256] * (width - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in examples])
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples])
    return ids, labels, mask


def ours(path):
    """log-probs (rows, positions, vocab) of a checkpoint of ours (or the plain backbone) on examples."""
    model, _, _ = load_checkpoint(path)
    task_id = model.task_id("sentiment")
    virtual = task_id >= 0 and model.tasks["sentiment"].num_virtual_tokens > 0
    banned = list(TASK.banned_ids())

    @torch.no_grad()
    def logprobs(examples):
        batch = collate(examples, task_id)
        extra = {"virtual_ids": batch["virtual_ids"]} if "virtual_ids" in batch else {}
        logits = model(batch["input_ids"], token_type_ids=batch["token_type_ids"],
                       task_ids=batch["task_ids"] if task_id >= 0 else None, use_cache=False,
                       **extra).logits.float()
        logits[..., banned] = -float("inf")
        return logits.log_softmax(-1)
    return logprobs, virtual


def peft_run(kind, lr, seed=42, epochs=10, batch_size=8):
    torch.manual_seed(seed)
    order = random.Random(seed)
    config = (PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=10, encoder_hidden_size=128)
              if kind == "ptuning" else PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10))
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(BACKBONE), config)
    train = [example(r, virtual=False) for r in records("train")]
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(train) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))
    model.train()
    for _ in range(epochs):
        order.shuffle(train)
        for start in range(0, len(train), batch_size):
            ids, labels, mask = padded(train[start:start + batch_size])
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    model.eval()

    @torch.no_grad()
    def logprobs(examples):
        ids, _, mask = padded(examples)
        # past the prompt
        return model(input_ids=ids, attention_mask=mask).logits[:, 10:].float().log_softmax(-1)
    return logprobs, False


def score(logprobs, virtual):
    label_nll, eos_nll, ranked, first = [], [], 0, collections.Counter()
    valid = records("valid")
    for record in valid:
        candidates = [example(dict(record, label=label), virtual) for label in LABELS]
        lp = logprobs(candidates)
        label_scores = []
        for row, built in enumerate(candidates):
            targets = [t for t, y in enumerate(built["labels"]) if y != -100]  # the label token(s), then EOS
            nll = [-lp[row, t - 1, built["input_ids"][t]].item() for t in targets]
            label_scores.append(-sum(nll[:-1]))
            if LABELS[row] == record["label"]:
                label_nll.append(sum(nll[:-1]) / (len(nll) - 1))
                eos_nll.append(nll[-1])
                first[TOKENIZER.decode([int(lp[row, targets[0] - 1].argmax())])] += 1
        ranked += LABELS[max(range(len(LABELS)), key=label_scores.__getitem__)] == record["label"]
    n = len(valid)
    return {"label_nll": sum(label_nll) / n, "eos_nll": sum(eos_nll) / n, "ranked": ranked / n,
            "first": ", ".join(f"`{json.dumps(t)}` {c}" for t, c in first.most_common(3))}


def main():
    rows = [("zero-shot (the stand-in, no training)", ours(BACKBONE))]
    for method in ("ptuning", "adapter"):
        path = os.path.join(RUNS, f"sentiment_{method}_f1")
        if not os.path.isdir(path):
            sys.exit(f"error: {path} is missing: run `bash run.sh --mini --stages user_tasks` first")
        rows.append((f"ours: {method} (the study's run, lr 1e-2)", ours(path)))
    rows.append(("PEFT: p-tuning, lr 1e-2", peft_run("ptuning", 1e-2)))
    rows.append(("PEFT: prompt tuning, lr 0.3", peft_run("prompt", 0.3)))
    lines = ["# Why p-tuning scores 0 on the stand-in", "",
             "Command: `python results/mini/prompt_study/diagnosis.py` "
             "(its docstring says what each row is). "
             "Sentiment valid split, 56 records; no decoding but the greedy first token.", "",
             "| run | label-token NLL | <\\|endoftext\\|> NLL | gold label likeliest of three "
             "| greedy first tokens |",
             "|---|---:|---:|---:|---|"]
    for name, (logprobs, virtual) in rows:
        s = score(logprobs, virtual)
        lines.append(f"| {name} | {s['label_nll']:.2f} | {s['eos_nll']:.2f} | {s['ranked']:.3f} | "
                     f"{s['first']} |")
        print(lines[-1], flush=True)
    write_text(os.path.join(os.path.dirname(os.path.abspath(__file__)), "diagnosis.md"),
               "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
