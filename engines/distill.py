"""Sentence-level knowledge distillation (the authors' sentence_distiller.py): a teacher decodes
every training input and its outputs become the training targets of `train.py --distillation`.

The distilled dataset is a NEW copy of the user's dataset whose training examples carry the
teacher's outputs (what each kind of task writes there: tasks/, `distillation_job`); the other
splits are copied unchanged, so validation stays gold. Progress goes to `<output>.partial.jsonl`
(a settings line, then one line per finished example), flushed after every batch, so an
interrupted run resumes where it stopped."""
import hashlib
import json
import os

from engines.generate import generate
from tasks.base import decode_text
from utils.errors import VLMError
from utils.progress import progress_bar

PARTIAL_SUFFIX = ".partial.jsonl"


def partial_path(output_path):
    return os.path.normpath(output_path) + PARTIAL_SUFFIX


def run_settings(task, dataset_raw, checkpoint, options, max_history, count):
    """What the outputs depend on; a partial file written with other settings is not resumed.
    The batch size and device are left out: they do not change the decoded tokens."""
    config = os.path.join(checkpoint, "vlm_config.json")
    teacher = {"path": os.path.abspath(checkpoint)}
    if os.path.isfile(config):
        with open(config, "rb") as f:
            teacher["config_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return {"format": "vlm-distill-partial", "version": 1, "task": task.name,
            "dataset_sha256": hashlib.sha256(dataset_raw).hexdigest(), "teacher": teacher,
            "max_history": max_history, "examples": count,
            "decoding": {k: getattr(options, k) for k in ("max_length", "min_length", "no_sample",
                                                          "temperature", "top_k", "top_p", "seed")}}


# --- the progress file -------------------------------------------------------------------------
def read_partial(path, settings):
    """{example index: text} finished by an earlier run with the same settings ({} if no file).

    A last line cut short by a crash is ignored; anything else malformed is an error."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # text after the last newline was never finished
    if tail:
        # Drop the torn line now, so later appends start on a fresh line.
        with open(path, "wb") as f:
            f.write(b"".join(line + b"\n" for line in complete))
    if not complete:
        return {}
    try:
        header = json.loads(complete[0])
    except json.JSONDecodeError:
        raise VLMError(f"{path}: line 1 is not a settings line; delete the file to start over") from None
    if header != {"settings": settings}:
        raise VLMError(f"{path}: progress of a run with other settings (teacher, dataset, task or decoding "
                       f"flags); rerun with the same arguments or delete the file to start over")
    done = {}
    for number, line in enumerate(complete[1:], 2):
        try:
            entry = json.loads(line)
            index, text = entry["index"], entry["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise VLMError(f"{path}: line {number} is not a progress line; "
                           "delete the file to start over") from None
        if not (isinstance(index, int) and 0 <= index < settings["examples"] and isinstance(text, str)):
            raise VLMError(f"{path}: line {number}: bad example index or text; delete the file to start over")
        done[index] = text
    return done


class PartialWriter:
    """Appends finished examples to the progress file; each batch is flushed to disk before the next."""

    def __init__(self, path, settings):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            self._append([{"settings": settings}])

    def _append(self, entries):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
            f.flush()
            os.fsync(f.fileno())

    def add(self, texts):
        self._append([{"index": index, "text": text} for index, text in texts])


# --- decoding ----------------------------------------------------------------------------------
def decode_pending(model, tokenizer, prompts, done, options, batch_size, writer, progress=True,
                   desc="distilling"):
    """Decode the prompts whose index is not in `done`, longest first, one batch at a time,
    recording each batch in `writer` as soon as it is decoded; fills `done`.

    Greedy decoding of identical prompts gives identical outputs, so with --no_sample each distinct
    prompt (E2E repeats an MR once per reference) is decoded once and its text given to all."""
    groups = {}
    for index, prompt in enumerate(prompts):
        if index in done:
            continue
        key = (tuple(prompt.input_ids), tuple(prompt.token_type_ids)) if options.no_sample else index
        groups.setdefault(key, []).append(index)
    leaders = sorted(groups.values(), key=lambda members: -len(prompts[members[0]].input_ids))
    with progress_bar(total=len(prompts), initial=len(done), desc=desc, disable=not progress,
                      unit="ex") as bar:
        for start in range(0, len(leaders), batch_size):
            batch = leaders[start:start + batch_size]
            outputs = generate(model, [prompts[members[0]] for members in batch], options,
                               batch_size=batch_size, progress=False)
            # Raw decoded text, without the authors' space clean-up: train.py re-tokenizes it, and
            # raw text gives back the teacher's own tokens.
            finished = [(index, decode_text(tokenizer, ids, cleanup=False))
                        for members, ids in zip(batch, outputs) for index in members]
            writer.add(finished)
            done.update(finished)
            bar.update(len(finished))
    return done


def distill(model, tokenizer, task, dataset_path, output_path, options, task_id, max_history, checkpoint,
            batch_size=32, dataset_cache=None, progress=True):
    """Decode every training input of `task` with the teacher and write the distilled copy to
    `output_path` (a file; a user task's: a folder). Returns (examples, decoded now): what an
    earlier interrupted run finished is not decoded again."""
    job = task.distillation_job(dataset_path, output_path, tokenizer, max_history, task_id, dataset_cache)
    settings = run_settings(task, job.source_bytes, checkpoint, options, max_history, len(job.prompts))
    progress_file = partial_path(output_path)
    done = read_partial(progress_file, settings)
    resumed = len(done)
    if resumed and progress:
        print(f"resuming from {progress_file}: {resumed} of {len(job.prompts)} examples already distilled")
    writer = PartialWriter(progress_file, settings)
    decode_pending(model, tokenizer, job.prompts, done, options, batch_size, writer, progress, desc=task.name)
    job.write(output_path, [done[i] for i in range(len(job.prompts))])
    os.remove(progress_file)
    return len(job.prompts), len(job.prompts) - resumed
