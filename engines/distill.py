"""Sentence-level knowledge distillation (the authors' sentence_distiller.py): a teacher decodes
every training input and its outputs become the training targets of `train.py --distillation`.

The distilled dataset is a NEW file, a copy of the user's dataset whose train records carry
`distillated_tgt` (mt, summarization, nlg: a string) or, per utterance, `distillated_candidates`
([string], dialogue and qa); the other splits are copied unchanged, so validation stays gold.
Progress goes to `<output>.partial.jsonl` (a settings line, then one line per finished example),
flushed after every batch, so an interrupted run resumes where it stopped."""
import hashlib
import json
import os

from utils.data import iter_contexts, load_task_data, read_json_file, split_records
from utils.errors import VLMError
from engines.evaluation import decode_text, make_prompt
from engines.generate import generate
from utils.io import atomic_folder, write_json
from utils.progress import progress_bar

DISTILLED_SUFFIX = ".distilled.json"
PARTIAL_SUFFIX = ".partial.jsonl"


def distilled_path(dataset_path, task=None):
    """`data/x.json` -> `data/x.distilled.json`: where the distiller writes and train.py looks; a
    user task's folder `data/x` -> the folder `data/x.distilled`."""
    if task is not None and task.layout == "template":
        return os.path.normpath(dataset_path) + ".distilled"
    return os.path.splitext(dataset_path)[0] + DISTILLED_SUFFIX


def partial_path(output_path):
    return output_path + PARTIAL_SUFFIX


def check_paths(dataset_path, output_path):
    """The user's dataset is never overwritten: refuse an --output that is the dataset file."""
    if not os.path.isfile(dataset_path):
        raise VLMError(f"--dataset_path {dataset_path}: dataset file not found")
    same = os.path.realpath(output_path) == os.path.realpath(dataset_path) or (
        os.path.exists(output_path) and os.path.samefile(output_path, dataset_path))
    if same:
        raise VLMError(f"--output {output_path}: is the dataset file itself; the distilled copy needs "
                       f"another name (default: {distilled_path(dataset_path)})")
    if os.path.isdir(output_path):
        raise VLMError(f"--output {output_path}: is a folder; give a file name")


# --- what is decoded ---------------------------------------------------------------------------
def example_positions(task, records):
    """(record index, utterance index or None) of every training example, in iter_contexts' order."""
    if task.layout == "dialogue":
        return [(i, j) for i, record in enumerate(records) for j in range(len(record["utterances"]))]
    return [(i, None) for i in range(len(records))]


def distillation_prompts(task, records, max_history, task_id):
    """One decoding prompt per training example: every record (every utterance for dialogue/qa).

    The contexts are training's (persona rotated per utterance, sources cut as training cuts them).
    for_training=False only keeps the seq2seq pairs training drops for being under `min_tokens`
    (and skips the target cut, which touches no prompt): the distilled copy has a target for
    every record, as the authors' distiller did."""
    prompts = []
    for index, (context, _, _, _) in enumerate(iter_contexts(task, records, max_history, rotate_persona=True,
                                                                for_training=False)):
        # meta["index"]: the example's own sampling seed, whatever batch it lands in (and on resume).
        prompts.append(make_prompt(task, context, task_id, {"index": index}))
    return prompts


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
            "decoding": {k: getattr(options, k) for k in ("max_length", "min_length", "no_sample", "temperature",
                                                          "top_k", "top_p", "seed")}}


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
            raise VLMError(f"{path}: line {number} is not a progress line; delete the file to start over") from None
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
def decode_pending(model, tokenizer, prompts, done, options, batch_size, writer, progress=True, desc="distilling"):
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
    with progress_bar(total=len(prompts), initial=len(done), desc=desc, disable=not progress, unit="ex") as bar:
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


def attach_targets(task, raw_records, positions, texts):
    """A copy of the raw train records with the distilled targets added."""
    records = json.loads(json.dumps(raw_records))  # deep copy; the caller's data stays as read
    for (i, j), text in zip(positions, texts):
        if j is None:
            records[i]["distillated_tgt"] = text
        else:
            records[i]["utterances"][j]["distillated_candidates"] = [text]
    return records


def distill_dataset(model, tokenizer, task, dataset_path, output_path, options, task_id, max_history,
                    checkpoint, batch_size=32, dataset_cache=None, progress=True):
    """Decode every training input with the teacher and write the distilled copy to `output_path`.
    Returns (examples, decoded now): what an earlier interrupted run finished is not decoded again."""
    check_paths(dataset_path, output_path)
    train_split = task.splits[0]
    dataset, raw = read_json_file(dataset_path)
    raw_records = split_records(dataset, train_split, dataset_path)
    records = load_task_data(task, dataset_path, tokenizer, [train_split], dataset_cache)[train_split]
    positions = example_positions(task, raw_records)
    prompts = distillation_prompts(task, records, max_history, task_id)
    if len(prompts) != len(positions):  # iter_contexts yields every record and utterance here
        raise RuntimeError(f"{len(prompts)} prompts for {len(positions)} training examples")

    settings = run_settings(task, raw, checkpoint, options, max_history, len(prompts))
    progress_file = partial_path(output_path)
    done = read_partial(progress_file, settings)
    resumed = len(done)
    if resumed and progress:
        print(f"resuming from {progress_file}: {resumed} of {len(prompts)} examples already distilled")
    writer = PartialWriter(progress_file, settings)
    decode_pending(model, tokenizer, prompts, done, options, batch_size, writer, progress, desc=task.name)

    # A copy of the user's dataset; only the train records change (validation stays gold).
    distilled = dict(dataset)
    distilled[train_split] = attach_targets(task, raw_records, positions, [done[i] for i in range(len(prompts))])
    write_json(output_path, distilled, indent=None)
    os.remove(progress_file)
    return len(prompts), len(prompts) - resumed


# --- user tasks --------------------------------------------------------------------------------
def distill_template_dataset(model, tokenizer, task, folder, output_folder, options, task_id, checkpoint,
                             batch_size=32, progress=True):
    """A user task: decode every train.jsonl record's prompt with the teacher and write the folder
    `output_folder` (train.jsonl with each record's `distillated_tgt`: the teacher's answer, cut at
    the task's stop rule; valid.jsonl and test.jsonl copied). Written beside and renamed into
    place; resumable from `<output_folder>.partial.jsonl` as distill_dataset is."""
    import shutil

    from engines.evaluation import template_prompt
    from utils.templates import SPLIT_FILES, cut_at_stop, template_dataset, user_task_split_path
    if os.path.realpath(output_folder) == os.path.realpath(folder):
        raise VLMError(f"--output {output_folder}: is the dataset folder itself; the distilled copy needs another "
                       f"name (default: {distilled_path(folder, task)})")
    if os.path.exists(output_folder) and (not os.path.isdir(output_folder) or os.listdir(output_folder)):
        raise VLMError(f"--output {output_folder}: exists; remove it or choose another folder")
    train_path = user_task_split_path(folder, "train")
    items = template_dataset(task, folder, tokenizer, ["train"])["train"]
    prompts = [template_prompt(task, item, task_id) for item in items]
    for index, prompt in enumerate(prompts):
        prompt.meta["index"] = index
    with open(train_path, "rb") as f:
        raw = f.read()
    settings = run_settings(task, raw, checkpoint, options, 0, len(prompts))
    progress_file = partial_path(os.path.normpath(output_folder))
    done = read_partial(progress_file, settings)
    resumed = len(done)
    writer = PartialWriter(progress_file, settings)
    decode_pending(model, tokenizer, prompts, done, options, batch_size, writer, progress, desc=task.name)
    with atomic_folder(output_folder) as tmp:  # output_folder is missing or empty (checked above)
        lines = [json.dumps(dict(item["record"], distillated_tgt=cut_at_stop(done[i], task)), ensure_ascii=False)
                 for i, item in enumerate(items)]
        with open(os.path.join(tmp, SPLIT_FILES["train"]), "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        for split in ("valid", "test"):
            source = os.path.join(folder, SPLIT_FILES[split])
            if os.path.isfile(source):
                shutil.copyfile(source, os.path.join(tmp, SPLIT_FILES[split]))
    os.remove(progress_file)
    return len(prompts), len(prompts) - resumed
