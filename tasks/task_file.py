"""User tasks defined in a task file: NeMo-style prompt templates with virtual tokens.

A task file is JSON, an object whose `task_templates` holds a list of tasks (the name of NeMo's
config entry)::

    {"task_templates": [
        {"taskname": "sentiment",
         "prompt_template": "<|VIRTUAL_PROMPT_0|> {sentence} sentiment: {label}",
         "total_virtual_tokens": 10, "virtual_token_splits": [10],
         "truncate_field": "sentence", "answer_only_loss": true, "answer_field": "label",
         "metric": "accuracy", "label_map": {"positivt": "positive"}}]}

NeMo's keys (the first five and `answer_field` are required; the others default as in NeMo):

- `taskname`: letters, digits, `_` and `-`; not a built-in task's name, not `all`.
- `prompt_template`: text with `{field}` slots (field names are identifiers; each field once) and
  `<|VIRTUAL_PROMPT_i|>` markers, numbered 0, 1, ... in order, one per entry of the splits.
- `total_virtual_tokens` (positive int) and `virtual_token_splits` (positive ints summing to it):
  split i is the number of virtual tokens at marker i.
- `truncate_field` (default null): the field whose tokens are cut when an example is too long.
- `answer_only_loss` (default false, NeMo's): train on the answer only, or on every real token.
- `answer_field`: the field the model generates. It must end the template (only whitespace may
  follow it) and cannot be the truncate_field.

Our additions, all optional:

- `method` (default "ptuning"): the per-task method; any string here, the model layer checks it.
- `method_options` (default {}): an object of the method's flags.
- `metric` (default "exact_match"): a metric of tasks/metrics.py whose reference is one string
  (TEXT_METRICS: accuracy, intent_slot, exact_match, token_f1, bleu, rouge, sacrebleu, f1).
- `label_map` (default {}): variant -> canonical label, applied to predictions and references
  before scoring (see utils.metrics.apply_label_map: matched after stripping and lowercasing).
- `max_seq_length` (default 512): the most tokens of one example, virtual tokens included.
- `max_answer_tokens` (default 32): the most tokens decoded for one answer.
- `stop` (default ["\\n"]): decoding stops at the first of these strings (and always at GPT-2's
  <|endoftext|>, see tasks/template.py).

Every mistake is one VLMError naming the file, the task and the key.
"""
import difflib
import json
import re

from models.methods import method_class
from tasks.metrics import TEXT_METRICS
from tasks.table import TASKS
from tasks.template import DEFAULTS, FIRST_USER_TASK_ID, TemplateTask
from utils.data import read_json_file
from utils.errors import VLMError, json_kind
from utils.metrics import normalize_label

REQUIRED_KEYS = ("taskname", "prompt_template", "total_virtual_tokens", "virtual_token_splits",
                 "answer_field")
KNOWN_KEYS = REQUIRED_KEYS + tuple(DEFAULTS)
RESERVED_NAMES = ("all",)

TASKNAME = re.compile(r"[A-Za-z0-9_-]+")
# One element of a template: a virtual-token marker, a {field}, a stray brace or a malformed marker.
TEMPLATE_ELEMENT = re.compile(r"<\|VIRTUAL_PROMPT_(\d+)\|>|\{([^{}]*)\}|[{}]|<\|VIRTUAL_PROMPT[^>]*>?")
MARKER = "<|VIRTUAL_PROMPT_{}|>"


def _shown(value):
    """A JSON value as the user wrote it ("10", true, null, [7, 2]), cut to 60 characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _count(n, what):
    return f"{n} {what}" + ("" if n == 1 else "s")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def parse_template(template, fail):
    """The template's parts; `fail(message)` raises the error for the prompt_template key."""
    parts, position = [], 0

    def text(piece):
        if piece:
            parts.append(("text", piece))

    for match in TEMPLATE_ELEMENT.finditer(template):
        text(template[position:match.start()])
        position = match.end()
        marker, field = match.group(1), match.group(2)
        if marker is not None:
            parts.append(("virtual", int(marker)))
        elif field is not None:
            if not field.isidentifier():
                fail(f"field name {field!r} in {{{field}}} is not an identifier")
            parts.append(("field", field))
        elif match.group(0) in "{}":
            fail(f"unmatched {match.group(0)!r} at character {match.start()} (fields are written {{name}})")
        else:
            fail(f"malformed virtual-token marker {match.group(0)!r} "
                 f"(expected <|VIRTUAL_PROMPT_0|>, <|VIRTUAL_PROMPT_1|>, ...)")
    text(template[position:])
    return tuple(parts)


def _describe_part(part):
    kind, value = part
    if kind == "virtual":
        return MARKER.format(value)
    if kind == "field":
        return f"{{{value}}}"
    return repr(value.strip())


def _check_task(task, index, path, seen, task_id=None):
    if not isinstance(task, dict):
        raise VLMError(f"{path}: task_templates[{index}]: expected a task object, got {json_kind(task)}")
    where = f"{path}: task_templates[{index}]"
    name = task.get("taskname")
    if "taskname" not in task:
        raise VLMError(f"{where}: missing required key 'taskname'")
    if not isinstance(name, str):
        raise VLMError(f"{where}: taskname: expected a string, got {_shown(name)}")
    if not TASKNAME.fullmatch(name):
        raise VLMError(f"{where}: taskname: {name!r} may only hold letters, digits, '_' and '-'")
    where = f"{path}: task {name!r}"

    def fail(key, message):
        raise VLMError(f"{where}: {key}: {message}")

    if name in TASKS:
        fail("taskname", f"{name!r} is a built-in task; choose another name")
    if name in RESERVED_NAMES:
        fail("taskname", f"{name!r} is reserved (it means every task); choose another name")
    if name in seen:
        fail("taskname", f"defined twice (task_templates[{seen[name]}] and task_templates[{index}])")
    seen[name] = index
    for key in task:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(KNOWN_KEYS)})"
            raise VLMError(f"{where}: unknown key {key!r}{hint}")
    for key in REQUIRED_KEYS:
        if key not in task:
            raise VLMError(f"{where}: missing required key {key!r}")
    values = {**DEFAULTS, **task}

    # --- types ---
    template = values["prompt_template"]
    if not isinstance(template, str) or not template.strip():
        fail("prompt_template", f"expected a non-empty string, got {_shown(template)}")
    for key in ("total_virtual_tokens", "max_seq_length", "max_answer_tokens"):
        if not _is_int(values[key]) or values[key] < 1:
            fail(key, f"expected a positive integer, got {_shown(values[key])}")
    splits = values["virtual_token_splits"]
    if not isinstance(splits, list) or not splits or not all(_is_int(s) and s >= 1 for s in splits):
        fail("virtual_token_splits", f"expected a non-empty list of positive integers, got {_shown(splits)}")
    truncate = values["truncate_field"]
    if truncate is not None and not isinstance(truncate, str):
        fail("truncate_field", f"expected a field name or null, got {_shown(truncate)}")
    answer = values["answer_field"]
    if not isinstance(answer, str):
        fail("answer_field", f"expected a field name, got {_shown(answer)}")
    if not isinstance(values["answer_only_loss"], bool):
        fail("answer_only_loss", f"expected true or false, got {_shown(values['answer_only_loss'])}")
    method = values["method"]
    if not isinstance(method, str) or not method:
        fail("method", f"expected a non-empty string, got {_shown(method)}")
    if not isinstance(values["method_options"], dict):
        fail("method_options",
             f"expected an object of the method's options, got {_shown(values['method_options'])}")
    metric = values["metric"]
    if not isinstance(metric, str):
        fail("metric", f"expected a string, got {_shown(metric)}")
    if metric not in TEXT_METRICS:
        fail("metric", f"unknown metric {metric!r} (choose one of {', '.join(TEXT_METRICS)})")
    label_map = values["label_map"]
    if not isinstance(label_map, dict):
        fail("label_map", f"expected an object of variant: label strings, got {_shown(label_map)}")
    normalized = {}
    for variant, label in label_map.items():
        if not isinstance(label, str) or not label.strip():
            fail("label_map", f"the label of {variant!r} must be a non-empty string, got {_shown(label)}")
        if not variant.strip():
            fail("label_map", f"an empty variant (mapped to {label!r})")
        other = normalized.setdefault(normalize_label(variant), (variant, label))
        if normalize_label(other[1]) != normalize_label(label):
            fail("label_map", f"{other[0]!r} and {variant!r} are the same variant after lowercasing "
                              f"but map to {other[1]!r} and {label!r}")
    stop = values["stop"]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        fail("stop", f"expected a list of non-empty strings, got {_shown(stop)}")

    # --- NeMo's rules ---
    if sum(splits) != values["total_virtual_tokens"]:
        fail("virtual_token_splits", f"{json.dumps(splits)} sums to {sum(splits)}, "
                                     f"but total_virtual_tokens is {values['total_virtual_tokens']}")
    parts = parse_template(template, lambda message: fail("prompt_template", message))
    markers = [value for kind, value in parts if kind == "virtual"]
    for expected, marker in enumerate(markers):
        if marker in markers[:expected]:
            fail("prompt_template", f"{MARKER.format(marker)} appears more than once")
        if marker != expected:
            fail("prompt_template", f"{MARKER.format(marker)} where {MARKER.format(expected)} was expected "
                                    f"(markers are numbered 0, 1, ... in order, each once)")
    if len(markers) != len(splits):
        fail("prompt_template", f"has {_count(len(markers), 'virtual-token marker')} "
                                f"but virtual_token_splits has "
                                f"{_count(len(splits), 'split')} (one marker per split)")
    fields = []
    for kind, value in parts:
        if kind == "field":
            if value in fields:
                fail("prompt_template", f"field {{{value}}} appears more than once")
            fields.append(value)
    known = f"(the template's fields: {', '.join(fields) or 'none'})"
    if truncate is not None and truncate not in fields:
        fail("truncate_field", f"unknown field {truncate!r} {known}")
    if answer not in fields:
        fail("answer_field", f"unknown field {answer!r} {known}")
    after = parts[parts.index(("field", answer)) + 1:]
    following = [part for part in after if not (part[0] == "text" and not part[1].strip())]
    if following:
        fail("answer_field", f"{{{answer}}} must end the template, "
                             f"but {_describe_part(following[0])} follows it")
    if answer == truncate:
        fail("answer_field", f"{answer!r} is also the truncate_field; the answer cannot be truncated")
    if values["total_virtual_tokens"] + values["max_answer_tokens"] >= values["max_seq_length"]:
        fail("max_answer_tokens", f"{values['max_answer_tokens']} answer tokens and "
                                  f"{values['total_virtual_tokens']} virtual tokens "
                                  f"leave no room for the input "
                                  f"within max_seq_length {values['max_seq_length']}")
    return TemplateTask(
        name=name, prompt_template=template, total_virtual_tokens=values["total_virtual_tokens"],
        virtual_token_splits=tuple(splits), truncate_field=truncate,
        answer_only_loss=values["answer_only_loss"], answer_field=answer, method=method,
        method_options=dict(values["method_options"]), metric=metric, label_map=dict(label_map),
        max_seq_length=values["max_seq_length"], max_answer_tokens=values["max_answer_tokens"],
        stop=tuple(stop), parts=parts, fields=tuple(fields), source=str(path),
        task_id=FIRST_USER_TASK_ID + index if task_id is None else task_id)


def load_task_file(path):
    """{taskname: TemplateTask} of a task file, in the file's order; see the module doc for the keys."""
    value, _ = read_json_file(path, "task")
    if not isinstance(value, dict):
        raise VLMError(f"{path}: expected a JSON object with a \"task_templates\" list, "
                       f"got {json_kind(value)}")
    for key in value:
        if key != "task_templates":
            raise VLMError(f"{path}: unknown top-level key {key!r} "
                           "(a task file holds only \"task_templates\")")
    if "task_templates" not in value:
        raise VLMError(f"{path}: no \"task_templates\" key (the list of tasks)")
    templates = value["task_templates"]
    if not isinstance(templates, list):
        raise VLMError(f"{path}: \"task_templates\" must be a list of task objects, "
                       f"got {json_kind(templates)}")
    if not templates:
        raise VLMError(f"{path}: \"task_templates\" is empty")
    seen, tasks = {}, {}
    for index, task in enumerate(templates):
        checked = _check_task(task, index, path, seen)
        tasks[checked.name] = checked
    return tasks


def recorded_user_tasks(config, where):
    """{taskname: TemplateTask} of the user tasks a checkpoint config records (each task entry
    holding a "template": the task-file entry it was trained from, and the task's id in the model)."""
    tasks, seen = {}, {}
    for index, (name, entry) in enumerate((config.get("tasks") or {}).items()):
        if isinstance(entry, dict) and "template" in entry:
            task = _check_task(entry["template"], index, where, seen, task_id=entry.get("task_id"))
            if task.name != name:
                raise VLMError(f"{where}: task {name!r} records the template of {task.name!r}")
            tasks[name] = task
    return tasks


def user_task_methods(task):
    """The task file's method as a method spec and {method: options}: `method_options` holds the
    options of a single method, or {method: options} for a composed one ("prompt+ln"); a virtual-token
    method's length is the template's total_virtual_tokens."""
    names = [part.strip() for part in task.method.split("+")]
    where = f"{task.source}: task {task.name!r}: method_options"
    if len(names) == 1:
        per_method = {names[0]: dict(task.method_options)}
    else:
        stray = [k for k in task.method_options if k not in names]
        if stray:
            raise VLMError(f"{where}: {stray[0]!r} is not one of the methods {task.method!r} joins "
                           f"(a composed method's options are given per method)")
        per_method = {n: dict(task.method_options.get(n, {})) for n in names}
    for name in names:
        if method_class(name).adds_virtual_tokens():
            length = per_method[name].get("length", task.total_virtual_tokens)
            if length != task.total_virtual_tokens:
                raise VLMError(f"{where}: length {length} differs from total_virtual_tokens "
                               f"{task.total_virtual_tokens}")
            per_method[name]["length"] = task.total_virtual_tokens
    return per_method
