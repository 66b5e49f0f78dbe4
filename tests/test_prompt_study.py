"""python -m engines.prompt_study: the p-tuning article's study as one command, here on a tiny
random GPT-2 (one method, one fraction, zero-shot): every step runs, the tables hold the metrics
files' values, both tasks end in one VLM with the first task's predictions unchanged, the output
ceiling covers every token of the training answers, and a second run repeats nothing."""
import csv
import json
import os
import subprocess
import sys
from collections import Counter

from conftest import REPO
from test_user_tasks import SENTENCES, TASK_FILE, UTTERANCES, write_jsonl
from transformers import GPT2LMHeadModel

from models.output_ceiling import output_ceiling
from tasks.template import EOS_ID
from utils.vocab import GPT2_VOCAB_SIZE


def test_the_study_runs_every_step_writes_its_tables_and_resumes(tmp_path, tiny_base, tokenizer):
    templates = json.loads(json.dumps(TASK_FILE["task_templates"][:2]))
    templates[1]["method"] = "ptuning"  # one method for both tasks: the smallest sweep
    (tmp_path / "tasks.json").write_text(json.dumps({"task_templates": templates}), encoding="utf-8")
    rows = {"sentiment": [{"taskname": "sentiment", "sentence": s, "label": label} for s, label in SENTENCES],
            "intent_and_slot": [{"taskname": "intent_and_slot", "utterance": u, "label": label}
                                for u, label in UTTERANCES]}
    for name, records in rows.items():
        for split in ("train", "valid", "test"):
            write_jsonl(tmp_path / name / f"{split}.jsonl", records)
    command = [sys.executable, "-m", "engines.prompt_study", "--model", tiny_base,
               "--task_file", str(tmp_path / "tasks.json"),
               "--data", f"sentiment={tmp_path / 'sentiment'}",
               f"intent_and_slot={tmp_path / 'intent_and_slot'}",
               "--methods", "ptuning", "--fractions", "0.5", "--shots", "0", "--n_epochs", "1",
               "--runs", str(tmp_path / "runs"), "--output_dir", str(tmp_path / "out")]
    # the continual part uses each task's own method at fraction 1: not in this sweep, so it is an error
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "error: --fractions: the continual-learning part needs 1" in done.stderr
    command[command.index("0.5")] = "1,0.5"
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = tmp_path / "runs"
    study = (tmp_path / "out" / "study.md").read_text()
    table = list(csv.DictReader(open(tmp_path / "out" / "study.csv")))
    assert (tmp_path / "out" / "study.png").stat().st_size > 10_000
    metrics = json.load(open(runs / "eval" / "sentiment_ptuning_f0.5" / "sentiment_metrics.json"))
    row = next(r for r in table if r["task"] == "sentiment" and r["setting"] == "ptuning"
               and r["train_fraction"] == "0.5" and r["metric"] == "accuracy")
    assert float(row["value"]) == metrics["accuracy"] and row["train_examples"] == "3"  # ceil(0.5 x 6)
    assert f"{metrics['accuracy']:.3f} (n=3)" in study
    last = json.load(open(runs / "continual" / "vlm2_sentiment+intent_and_slot" / "vlm_config.json"))
    assert sorted(last["tasks"]) == ["intent_and_slot", "sentiment"]
    assert "| sentiment | " in study and "| yes |" in study  # the first task's predictions unchanged
    # the output ceiling of every distinct token of the training answers, recomputed here
    ceiling = [r for r in csv.DictReader(open(tmp_path / "out" / "study_ceiling.csv"))
               if r["task"] == "sentiment"]
    answers = Counter(t for _, label in SENTENCES for t in tokenizer(" " + label)["input_ids"] + [EOS_ID])
    assert {int(r["token_id"]): int(r["count_in_train_answers"]) for r in ceiling} == answers
    expected = output_ceiling(GPT2LMHeadModel.from_pretrained(tiny_base),
                              [int(r["token_id"]) for r in ceiling], vocab=GPT2_VOCAB_SIZE)
    assert max(abs(float(r["lowest_nll"]) - nll) for r, nll in zip(ceiling, expected)) < 2e-4
    assert "## What the frozen output layer allows" in study and "The method ptuning leaves" in study
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "+ " not in again.stdout.replace("+intent", "")  # nothing ran again
    assert os.path.getsize(tmp_path / "out" / "study.md") == len(study.encode())
