"""The template kind: user tasks of a task file (tasks/task_file.py), NeMo-style prompt templates
with virtual tokens; their input builder, JSON-lines data and decoding stop rule.

An example of a template task is the task's prompt template with its fields filled in from one
record and `<|VIRTUAL_PROMPT_i|>` replaced by virtual_token_splits[i] virtual tokens. Template
tasks use no special tokens and no segment embeddings: a virtual position holds
VIRTUAL_PLACEHOLDER_ID (the model replaces its embedding with the task's virtual token), every
token_type_id is NO_SEGMENT, and a training example ends with GPT-2's <|endoftext|> (EOS_ID).
"""
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field

from tasks.base import DISTILLED_KEY, DistillationJob, Hyper, Prompt, TaskKind
from tasks.table import TASKS
from utils.data import IGNORE_INDEX, PAD_ID, read_jsonl, read_text, text_lines
from utils.errors import VLMError, json_kind
from utils.io import atomic_folder, write_lines

# User tasks take the ids after the five built-in ones, in task-file order (a combined model moves
# a clashing id to the next free one). They own no special-token rows.
FIRST_USER_TASK_ID = len(TASKS)
# Training defaults of a user task (flags override): batches of 8, 10 epochs, the method's rate.
USER_TASK_HYPER = Hyper(8, 1, 10, 1e-3)
# A task file's optional keys and their defaults (NeMo's, and ours: tasks/task_file.py).
DEFAULTS = {
    "truncate_field": None,
    "answer_only_loss": False,
    "method": "ptuning",
    "method_options": {},
    "metric": "exact_match",
    "label_map": {},
    "max_seq_length": 512,
    "max_answer_tokens": 32,
    "stop": ["\n"],
}
VIRTUAL_PLACEHOLDER_ID = PAD_ID  # 50257
NO_SEGMENT = -1
EOS_ID = 50256                   # GPT-2's <|endoftext|>
SPLIT_FILES = {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}


class ExampleTooLong(VLMError):
    """An example exceeds its task's max_seq_length and cutting its truncate_field cannot fix it.
    `length` is its length in tokens, `limit` the most it may have (for a decoding prompt,
    max_seq_length - max_answer_tokens)."""

    def __init__(self, message, length, limit):
        super().__init__(message)
        self.length, self.limit = length, limit


def _encode(tokenizer, text):
    # split_special_tokens: text that spells "<|endoftext|>" or "<pad>" is ordinary text here.
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []


def _segments(task, record, tokenizer, with_answer):
    """[(kind, name, ids)] in template order; kind "text", "field" or "virtual"."""
    segments, carry, first_virtual = [], "", 0
    for index, (kind, value) in enumerate(task.parts):
        if kind == "virtual":
            size = task.virtual_token_splits[value]
            segments.append(("virtual", value, list(range(first_virtual, first_virtual + size))))
            first_virtual += size
        elif kind == "text":
            following = task.parts[index + 1] if index + 1 < len(task.parts) else None
            if following is not None and following[0] == "field":
                body = value.rstrip()
                carry = value[len(body):]  # trailing whitespace moves into the next field's text
                value = body
            if (following is None and segments and segments[-1][0] == "field"
                    and segments[-1][1] == task.answer_field):
                continue  # whitespace after the answer ends nothing: dropped
            segments.append(("text", None, _encode(tokenizer, value)))
        else:
            if value == task.answer_field and not with_answer:
                break  # the decoding prompt stops where the answer (and its leading space) begins
            text = carry + record[value]
            carry = ""
            if value == task.answer_field:
                segments.append(("field", value, _encode(tokenizer, text) + [EOS_ID]))
            else:
                segments.append(("field", value, _encode(tokenizer, text)))
    return segments


def build_template_example(task, record, tokenizer, with_answer=True):
    """input_ids, token_type_ids, labels and virtual_ids of one record of a template task.

    Tokenization (deterministic, so ids can be written by hand): every literal text piece and every
    field value is tokenized on its own with the GPT-2 tokenizer (no special tokens added, and
    text spelling a special token such as "<|endoftext|>" stays plain text), and the pieces are
    concatenated. Whitespace at the end of a literal piece that a field follows is moved to the
    start of that field's value, as GPT-2 puts a space in front of a word: "{sentence} sentiment:
    {label}" with label "positive" ends in the tokens of " sentiment", ":" and " positive". Text
    that a virtual marker or the template's end follows is tokenized as it is; whitespace after the
    answer field is dropped.

    Virtual marker i becomes virtual_token_splits[i] positions holding VIRTUAL_PLACEHOLDER_ID;
    `virtual_ids` numbers the task's virtual tokens across the splits in order (splits [7, 3]:
    0..6 at marker 0, 7..9 at marker 1) and is -1 at real tokens. `token_type_ids` is NO_SEGMENT
    everywhere.

    with_answer=True: the answer field's tokens are followed by EOS_ID. Labels follow this repo's
    convention (labels[t] = input_ids[t] where token t is a target, IGNORE_INDEX elsewhere; the
    model shifts): with answer_only_loss the targets are the answer's tokens and the EOS, without
    it every real token but the one at position 0. Virtual positions are never targets.
    with_answer=False: the decoding prompt, which stops where the answer field (with the whitespace
    moved into it) begins; labels are all IGNORE_INDEX.

    Length: a training example may hold task.max_seq_length tokens; a decoding prompt
    max_seq_length - max_answer_tokens, leaving room for the answer. A longer example has its
    truncate_field's tokens cut from their end (at least one token stays); when there is no
    truncate_field, or cutting it cannot make the example fit, ExampleTooLong is raised.
    """
    for name in task.fields:
        if name == task.answer_field and not with_answer:
            continue
        if name not in record:
            raise VLMError(f"task {task.name!r}: the record has no field {name!r}")
        if not isinstance(record[name], str):
            raise VLMError(f"task {task.name!r}: field {name!r} must be a string, "
                           f"got {json_kind(record[name])}")
    segments = _segments(task, record, tokenizer, with_answer)
    length = sum(len(ids) for _, _, ids in segments)
    limit = task.max_seq_length if with_answer else task.max_seq_length - task.max_answer_tokens
    if length > limit:
        over = (f"task {task.name!r}: the example has {length} tokens, over max_seq_length {limit}"
                if with_answer else
                f"task {task.name!r}: the prompt has {length} tokens, over the {limit} that max_seq_length "
                f"{task.max_seq_length} leaves after max_answer_tokens {task.max_answer_tokens}")
        if task.truncate_field is None:
            raise ExampleTooLong(f"{over}, and the task has no truncate_field", length, limit)
        position = next(i for i, (kind, name, _) in enumerate(segments)
                        if kind == "field" and name == task.truncate_field)
        kind, name, ids = segments[position]
        keep = len(ids) - (length - limit)
        if keep < 1:
            raise ExampleTooLong(f"{over}, even with its truncate_field {name!r} cut to one token", length,
                                 limit)
        segments[position] = (kind, name, ids[:keep])
    input_ids, virtual_ids, labels = [], [], []
    for kind, name, ids in segments:
        if kind == "virtual":
            input_ids += [VIRTUAL_PLACEHOLDER_ID] * len(ids)
            virtual_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
            continue
        input_ids += ids
        virtual_ids += [-1] * len(ids)
        if not with_answer:
            labels += [IGNORE_INDEX] * len(ids)
        elif task.answer_only_loss:
            labels += (list(ids) if kind == "field" and name == task.answer_field
                       else [IGNORE_INDEX] * len(ids))
        else:
            labels += list(ids)
    if labels:
        labels[0] = IGNORE_INDEX  # nothing predicts the first position
    return {"input_ids": input_ids, "token_type_ids": [NO_SEGMENT] * len(input_ids), "labels": labels,
            "virtual_ids": virtual_ids}


def template_records(task, path_or_items, source=None, require_answer=True):
    """[(line number, record)] of `task` in a JSON-lines file or in `(line number, object)` pairs
    (as read_jsonl returns; `source` names them in errors). One file may mix tasks: records
    whose `taskname` is another task are skipped. Errors name the file and line: a record without
    a string `taskname`, or one of this task lacking a template field (the answer may be absent
    when require_answer is false) or holding a non-string value; no record of the task at all."""
    if isinstance(path_or_items, (str, os.PathLike)):
        source, items = os.fspath(path_or_items), read_jsonl(path_or_items)
    else:
        source, items = source or "records", list(path_or_items)
    records, names = [], {}
    for number, record in items:
        where = f"{source}, line {number}"
        if not isinstance(record, dict):
            raise VLMError(f"{where}: expected a JSON object, got {json_kind(record)}")
        if "taskname" not in record:
            raise VLMError(f"{where}: no \"taskname\" (each record names its task)")
        name = record["taskname"]
        if not isinstance(name, str):
            raise VLMError(f"{where}: \"taskname\" must be a string, got {json_kind(name)}")
        names[name] = None
        if name != task.name:
            continue
        for field_name in task.fields:
            if field_name not in record:
                if field_name == task.answer_field and not require_answer:
                    continue
                raise VLMError(f"{where}: task {task.name!r}: missing field {field_name!r} of the template")
            if not isinstance(record[field_name], str):
                raise VLMError(f"{where}: task {task.name!r}: field {field_name!r} must be a string, "
                               f"got {json_kind(record[field_name])}")
        records.append((number, record))
    if not records:
        raise VLMError(f"{source}: no records of task {task.name!r} "
                       f"(tasks in it: {', '.join(names) or 'none'})")
    return records


def user_task_split_path(folder, split):
    """folder/train.jsonl, valid.jsonl or test.jsonl: a user task's --dataset_path is a folder."""
    if split not in SPLIT_FILES:
        raise VLMError(f"unknown split {split!r} (a user task has {', '.join(SPLIT_FILES)})")
    if not os.path.exists(folder):
        raise VLMError(f"{folder}: dataset folder not found (a user task's dataset is a folder holding "
                       f"{', '.join(SPLIT_FILES.values())})")
    if not os.path.isdir(folder):
        raise VLMError(f"{folder}: not a folder (a user task's dataset is a folder holding "
                       f"{', '.join(SPLIT_FILES.values())})")
    path = os.path.join(folder, SPLIT_FILES[split])
    if not os.path.isfile(path):
        raise VLMError(f"{folder}: no {SPLIT_FILES[split]} (the {split} split this command reads)")
    return path


# --- a user task's dataset folder ---------------------------------------------------------------
def answer_token_ids(task, record, tokenizer):
    """The tokens a model must generate for one record: its answer field as the template puts it
    (with the whitespace moved into it), then EOS_ID."""
    return next(ids for kind, name, ids in _segments(task, record, tokenizer, True)
                if kind == "field" and name == task.answer_field)


def template_item(task, record, where, tokenizer, require_answer=True):
    """One record of a template task, built: `example` (training; None without the answer),
    `distilled` (the example with the distiller's answer, when the record has one), `prompt`
    (decoding), `answer` and `where` ("FILE, line N", which every error about it names)."""
    def build(values, with_answer):
        try:
            return build_template_example(task, values, tokenizer, with_answer)
        except VLMError as error:
            raise VLMError(f"{where}: {error}") from None

    has_answer = task.answer_field in record
    if require_answer and not has_answer:
        raise VLMError(f"{where}: task {task.name!r}: missing field {task.answer_field!r} of the template")
    distilled = record.get(DISTILLED_KEY)
    if distilled is not None and not isinstance(distilled, str):
        raise VLMError(f"{where}: {DISTILLED_KEY!r} must be a string, got {json_kind(distilled)}")
    return {"where": where, "record": record, "answer": record.get(task.answer_field),
            "example": build(record, True) if has_answer else None,
            "distilled": (build(dict(record, **{task.answer_field: distilled}), True)
                          if distilled is not None else None),
            "prompt": build(record, False)}


def template_dataset(task, folder, tokenizer, splits):
    """{split: [template_item]} of a user task's --dataset_path folder (train/valid/test.jsonl)."""
    data = {}
    for split in splits:
        path = user_task_split_path(folder, split)
        data[split] = [template_item(task, record, f"{path}, line {number}", tokenizer)
                       for number, record in template_records(task, path)]
    return data


def without_virtual_positions(example):
    """The example (or prompt fields) with its virtual-token positions taken out: for a model whose
    task has no virtual tokens (adapter, LoRA, ...; few-shot prompting of a plain backbone)."""
    keep = [i for i, v in enumerate(example["virtual_ids"]) if v < 0]
    return {key: ([value[i] for i in keep] if key in ("input_ids", "token_type_ids", "labels", "virtual_ids")
                  else value) for key, value in example.items()}


def few_shot_text(task, records, tokenizer):
    """Token ids of k solved examples put in front of a prompt (--shots k): each record's template
    with the answer filled in and no virtual tokens, then a blank line."""
    ids = []
    for record in records:
        example = without_virtual_positions(build_template_example(task, record, tokenizer, with_answer=True))
        ids += [i for i in example["input_ids"] if i != EOS_ID] + _encode(tokenizer, "\n\n")
    return ids


# --- decoding stop rule ------------------------------------------------------------------------
def cut_at_stop(text, task):
    """The answer in a decoded continuation: leading whitespace skipped (the answer's first token
    carries the template's space or newline), cut at the first of task.stop, then stripped."""
    text = text.lstrip()
    cut = min((i for i in (text.find(stop) for stop in task.stop) if i >= 0), default=len(text))
    return text[:cut].strip()


@dataclass(frozen=True)
class TemplateTask(TaskKind):
    """One user task of a task file, checked. `parts` is the parsed template: ("text", str),
    ("field", name) and ("virtual", split index) items in template order. Hashable: the two
    dicts take part in == but not in the hash."""
    kind = "template"
    name: str
    prompt_template: str
    total_virtual_tokens: int
    virtual_token_splits: tuple
    truncate_field: object        # a field name or None
    answer_only_loss: bool
    answer_field: str
    method: str
    method_options: dict = field(hash=False)
    metric: str
    label_map: dict = field(hash=False)
    max_seq_length: int
    max_answer_tokens: int
    stop: tuple
    parts: tuple
    fields: tuple
    source: str
    task_id: int = FIRST_USER_TASK_ID

    # --- what the engines read of every task (tasks/base.py's BuiltinTask has the same names) ---
    method_from_task_file = True
    special_tokens = ()           # no vocabulary rows: ids 50257-50286 stay the built-in tasks'
    splits = ("train", "valid")   # train.jsonl, valid.jsonl of the --dataset_path folder
    test_split = "test"
    default_dataset = None        # a user task's --dataset_path is always given
    bottleneck = 100              # the adapter's, when the method is adapter
    max_history = 0
    adapter = USER_TASK_HYPER
    full_finetune = USER_TASK_HYPER

    @property
    def metrics(self):
        return (self.metric,)

    def as_json(self):
        """The task's entry as a task file holds it (what a checkpoint records of the task)."""
        entry = {"taskname": self.name, "prompt_template": self.prompt_template,
                 "total_virtual_tokens": self.total_virtual_tokens,
                 "virtual_token_splits": list(self.virtual_token_splits)}
        for key, default in DEFAULTS.items():
            value = getattr(self, key)
            entry[key] = list(value) if isinstance(value, tuple) else value
        entry["answer_field"] = self.answer_field
        return entry

    def metric_options(self):
        return {"label_map": self.label_map}

    def checkpoint_meta(self):
        return {"template": self.as_json()}

    def command_flags(self, task_file=None):
        return f" --task_file {task_file or 'FILE'}"

    # --- data ------------------------------------------------------------------------------------
    def check_dataset_path(self, path, shown=None):
        """A user task's dataset is a folder of JSON-lines splits. `shown`: how errors name the flag
        and path (default `--dataset_path PATH`)."""
        shown = shown or f"--dataset_path {path}"
        if not path:
            raise VLMError(f"{shown.split()[0]}: task {self.name} is a user task; "
                           f"give its folder of train.jsonl, valid.jsonl and test.jsonl")
        if not os.path.isdir(path):
            raise VLMError(f"{shown}: dataset folder not found (task {self.name} reads train.jsonl, "
                           f"valid.jsonl and test.jsonl there)")

    def load_data(self, path, tokenizer, splits, cache_prefix=None):
        """{split: [template_item]} of the --dataset_path folder (no cache: templates build fast)."""
        return template_dataset(self, path, tokenizer, splits)

    def training_examples(self, records, max_history, distillation=False, max_positions=None, where=""):
        """The template's examples (with virtual_ids); longer than max_positions is an error naming
        the line."""
        examples = []
        for item in records:
            example = item["distilled"] if distillation else item["example"]
            if example is None:
                raise VLMError(f"{item['where']}: --distillation needs {DISTILLED_KEY!r}, "
                               "which this record lacks")
            if max_positions and len(example["input_ids"]) > max_positions:
                raise VLMError(f"{item['where']}: the example has {len(example['input_ids'])} tokens, "
                               f"over the model's {max_positions} positions "
                               "(lower the task's max_seq_length)")
            examples.append(example)
        if not examples:
            raise VLMError(f"{where}: no usable examples")
        return examples

    def partition_key(self, item):
        """The answer's first line: a sentiment's label, an assistant request's `Intent: ...`."""
        return (item["answer"] or "").split("\n", 1)[0].strip()

    # --- decoding ---------------------------------------------------------------------------------
    def stop_ids(self):
        """Token ids that end decoding: GPT-2's <|endoftext|>, for every template task."""
        return (EOS_ID,)

    def prompt(self, item, task_id, shots=()):
        """The decoding prompt of one record (template_item), with the token ids of `shots` solved
        examples in front (--shots k, few_shot_text)."""
        prompt = item["prompt"]
        shots = list(shots)
        return Prompt(shots + prompt["input_ids"], [NO_SEGMENT] * len(shots) + prompt["token_type_ids"],
                      task_id, self.stop_ids(), self.banned_ids(),
                      {"reference": item["answer"], "where": item["where"], "record": item["record"]},
                      virtual_ids=[-1] * len(shots) + prompt["virtual_ids"],
                      max_length=self.max_answer_tokens)

    def dataset_prompts(self, records, max_history, tokenizer, task_id, shots=()):
        return [self.prompt(item, task_id, shots) for item in records]

    def input_prompt(self, item, tokenizer, max_history, task_id, where):
        """A string (a task of one input field) or a JSON object of the template's input fields."""
        inputs = [f for f in self.fields if f != self.answer_field]
        if isinstance(item, str):
            if len(inputs) != 1:
                raise VLMError(f"{where}: task {self.name} has the fields {', '.join(inputs)}: "
                               "give a JSON object")
            item = {inputs[0]: item}
        if not isinstance(item, dict):
            raise VLMError(f"{where}: expected a string or a JSON object with the fields {', '.join(inputs)}")
        record = {name: item.get(name) for name in inputs}
        for name, value in record.items():
            if not isinstance(value, str):
                raise VLMError(f"{where}: task {self.name}: field {name!r} must be a string")
        return self.prompt(template_item(self, dict(record, taskname=self.name), where, tokenizer,
                                         require_answer=False), task_id)

    def chat_input(self, turns, where):
        """A task of one input field takes the last user message as that field."""
        inputs = [f for f in self.fields if f != self.answer_field]
        users = [text for role, text in turns if role == "user"]
        if len(inputs) != 1:
            raise VLMError(f"{where}: task {self.name} has the fields {', '.join(inputs)}: "
                           "send a JSON object of them to /v1/completions")
        if not users:
            raise VLMError(f"{where}: the conversation has no user message")
        return {inputs[0]: users[-1]}

    def output_text(self, tokenizer, ids, cleanup=True):
        """The answer: cut at the task's stop rule; never cleaned."""
        return cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), self)

    def shot_ids(self, dataset_path, tokenizer, shots, seed):
        """Token ids of `shots` solved training examples (--shots k), drawn with the seed."""
        if not shots:
            return []
        train = self.load_data(dataset_path, tokenizer, ["train"])["train"]
        if shots > len(train):
            raise VLMError(f"--shots {shots}: the train split of {dataset_path} has {len(train)} records")
        chosen = random.Random(seed).sample(train, shots)
        return few_shot_text(self, [item["record"] for item in chosen], tokenizer)

    # --- outputs ----------------------------------------------------------------------------------
    def read_outputs(self, path):
        """One answer a line, escaped as write_outputs escapes them (one_line)."""
        return [from_one_line(line) for line in text_lines(read_text(path, "hypotheses"))]

    def read_references(self, path):
        return [from_one_line(line) for line in text_lines(read_text(path, "references"))]

    def write_outputs(self, prompts, outputs, output_dir):
        """`<task>_output.txt` and `<task>_ref.txt` (one answer a line, newlines escaped as \\n) and
        `<task>_predictions.jsonl` (record, prediction, reference)."""
        def path(name):
            return os.path.join(output_dir, f"{self.name}_{name}")

        write_lines(path("output.txt"), [one_line(o) for o in outputs])
        write_lines(path("ref.txt"), [one_line(p.meta["reference"]) for p in prompts])
        write_lines(path("predictions.jsonl"),
                    [json.dumps({"where": p.meta["where"], "record": p.meta["record"],
                                 "prediction": o, "reference": p.meta["reference"]},
                                ensure_ascii=False) for p, o in zip(prompts, outputs)])

    # --- distillation -----------------------------------------------------------------------------
    def distilled_path(self, dataset_path):
        """A user task's folder `data/x` -> the folder `data/x.distilled`."""
        return os.path.normpath(dataset_path) + ".distilled"

    def check_distilled(self, records, path, split):
        for item in records:
            if item["distilled"] is None:
                raise VLMError(f"{item['where']}: --distillation needs {DISTILLED_KEY!r}, "
                               "which this record lacks")

    def check_distill_output(self, folder, output_folder):
        self.check_dataset_path(folder)
        if os.path.realpath(output_folder) == os.path.realpath(folder):
            raise VLMError(f"--output {output_folder}: is the dataset folder itself; "
                           f"the distilled copy needs another name (default: {self.distilled_path(folder)})")
        if os.path.exists(output_folder) and (not os.path.isdir(output_folder) or os.listdir(output_folder)):
            raise VLMError(f"--output {output_folder}: exists; remove it or choose another folder")

    def distillation_job(self, dataset_path, output_path, tokenizer, max_history, task_id,
                         dataset_cache=None):
        """Every train.jsonl record's prompt; the copy is the folder `output_path`: train.jsonl with
        each record's `distillated_tgt` (the teacher's answer, cut at the task's stop rule),
        valid.jsonl and test.jsonl copied, written beside and renamed into place."""
        self.check_distill_output(dataset_path, output_path)
        train_path = user_task_split_path(dataset_path, "train")
        items = template_dataset(self, dataset_path, tokenizer, ["train"])["train"]
        prompts = [self.prompt(item, task_id) for item in items]
        for index, prompt in enumerate(prompts):
            prompt.meta["index"] = index
        with open(train_path, "rb") as f:
            raw = f.read()

        def write(output, texts):
            with atomic_folder(output) as tmp:  # output is missing or empty (checked above)
                lines = [json.dumps(dict(item["record"], distillated_tgt=cut_at_stop(text, self)),
                                    ensure_ascii=False)
                         for item, text in zip(items, texts)]
                with open(os.path.join(tmp, SPLIT_FILES["train"]), "w", encoding="utf-8") as f:
                    f.write("".join(line + "\n" for line in lines))
                for split in ("valid", "test"):
                    source = os.path.join(dataset_path, SPLIT_FILES[split])
                    if os.path.isfile(source):
                        shutil.copyfile(source, os.path.join(tmp, SPLIT_FILES[split]))

        return DistillationJob(prompts, raw, write)


def one_line(text):
    """An answer on one line of `<task>_output.txt`: newlines (and backslashes) escaped as in JSON."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


_ESCAPE = re.compile(r"\\([\\n])")


def from_one_line(line):
    """one_line's inverse: \\n is a newline, \\\\ a backslash; any other backslash stays."""
    return _ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else "\\", line)
