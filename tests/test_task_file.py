"""tasks/task_file.py: task files with NeMo's keys and ours, every rule with its exact error line."""
import dataclasses
import json
import os

import pytest

from tasks.task_file import KNOWN_KEYS, load_task_file
from tasks.template import TemplateTask
from utils.errors import VLMError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SENTIMENT = {
    "taskname": "sentiment",
    "prompt_template": "<|VIRTUAL_PROMPT_0|> {sentence} sentiment: {label}",
    "total_virtual_tokens": 10,
    "virtual_token_splits": [10],
    "truncate_field": "sentence",
    "answer_only_loss": True,
    "answer_field": "label",
}
TWO_MARKERS = "<|VIRTUAL_PROMPT_0|> Predict intent and slot <|VIRTUAL_PROMPT_1|> :\n{utterance}\n{label}"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in tmp_path, so a task file is named just "tasks.json" in its errors."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(content, name="tasks.json"):
    with open(name, "wb") as f:
        f.write(content if isinstance(content, bytes) else json.dumps(content).encode())
    return name


def load_one(**changes):
    """Load a file holding SENTIMENT with `changes` applied."""
    task = {**SENTIMENT, **changes}
    return load_task_file(write({"task_templates": [task]}))


def error_of(**changes):
    with pytest.raises(VLMError) as caught:
        load_one(**changes)
    return str(caught.value)


def without(key):
    task = dict(SENTIMENT)
    del task[key]
    return task


# ---- a good file ----------------------------------------------------------------------------------


def test_the_example_task_file_of_the_nemo_article():
    tasks = load_task_file(os.path.join(REPO, "data", "tasks", "nemo_article.json"))
    assert list(tasks) == ["sentiment", "intent_and_slot"]
    sentiment, assistant = tasks["sentiment"], tasks["intent_and_slot"]
    assert sentiment.parts == (("virtual", 0), ("text", " "), ("field", "sentence"), ("text", " sentiment: "),
                               ("field", "label"))
    assert sentiment.fields == ("sentence", "label")
    assert (sentiment.total_virtual_tokens, sentiment.virtual_token_splits) == (10, (10,))
    assert (sentiment.truncate_field, sentiment.answer_field,
            sentiment.answer_only_loss) == ("sentence", "label", True)
    assert (sentiment.metric, sentiment.method, sentiment.stop) == ("accuracy", "ptuning", ("\n",))
    assert sentiment.label_map["negativt"] == "negative"
    assert assistant.parts == (("virtual", 0), ("text", " Predict intent and slot "), ("virtual", 1),
                               ("text", " :\n"), ("field", "utterance"), ("text", "\n"), ("field", "label"))
    assert assistant.virtual_token_splits == (7, 3)
    assert (assistant.truncate_field, assistant.answer_only_loss,
            assistant.metric) == (None, False, "intent_slot")
    assert assistant.stop == ()  # its label has a newline inside: decoding stops at <|endoftext|> only
    assert assistant.source.endswith(os.path.join("data", "tasks", "nemo_article.json"))


def test_defaults_of_the_optional_keys(in_tmp):
    task = {k: v for k, v in SENTIMENT.items() if k not in ("truncate_field", "answer_only_loss")}
    (loaded,) = load_task_file(write({"task_templates": [task]})).values()
    assert loaded == TemplateTask(
        name="sentiment", prompt_template=SENTIMENT["prompt_template"], total_virtual_tokens=10,
        virtual_token_splits=(10,), truncate_field=None, answer_only_loss=False, answer_field="label",
        method="ptuning", method_options={}, metric="exact_match", label_map={}, max_seq_length=512,
        max_answer_tokens=32, stop=("\n",), parts=loaded.parts, fields=("sentence", "label"),
        source="tasks.json")
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.name = "other"
    # hashable (a dict key, a set member) though it holds dicts
    assert {loaded: 1}[dataclasses.replace(loaded)] == 1


def test_our_keys_are_read_and_any_method_string_passes(in_tmp):
    (task,) = load_one(method="lora", method_options={"rank": 8}, metric="token_f1",
                       label_map={"Pos": "positive"}, max_seq_length=128, max_answer_tokens=5,
                       stop=["\n", "."]).values()
    assert (task.method, task.method_options, task.metric) == ("lora", {"rank": 8}, "token_f1")
    assert (task.label_map, task.max_seq_length, task.max_answer_tokens, task.stop) == (
        {"Pos": "positive"}, 128, 5, ("\n", "."))


def test_tasks_keep_the_file_order_and_trailing_whitespace_after_the_answer_is_allowed(in_tmp):
    second = {**SENTIMENT, "taskname": "a-task_2", "prompt_template": TWO_MARKERS + "\n ",
              "virtual_token_splits": [7, 3], "truncate_field": None}
    tasks = load_task_file(write({"task_templates": [{**SENTIMENT, "taskname": "zz"}, second]}))
    assert list(tasks) == ["zz", "a-task_2"]
    assert tasks["a-task_2"].parts[-1] == ("text", "\n ")


# ---- the file's structure -------------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    ([], 'tasks.json: expected a JSON object with a "task_templates" list, got a list'),
    ({}, 'tasks.json: no "task_templates" key (the list of tasks)'),
    ({"task_templates": {}}, 'tasks.json: "task_templates" must be a list of task objects, got an object'),
    ({"task_templates": []}, 'tasks.json: "task_templates" is empty'),
    ({"task_templates": [SENTIMENT], "tasks": []},
     "tasks.json: unknown top-level key 'tasks' (a task file holds only \"task_templates\")"),
    ({"task_templates": ["sentiment"]},
     "tasks.json: task_templates[0]: expected a task object, got a string"),
    ({"task_templates": [SENTIMENT, None]},
     "tasks.json: task_templates[1]: expected a task object, got null"),
])
def test_file_structure_errors(in_tmp, content, message):
    with pytest.raises(VLMError) as caught:
        load_task_file(write(content))
    assert str(caught.value) == message


def test_unreadable_files_reuse_the_dataset_reader_errors(in_tmp):
    with pytest.raises(VLMError) as caught:
        load_task_file("missing.json")
    assert str(caught.value) == "missing.json: task file not found"
    with pytest.raises(VLMError) as caught:
        load_task_file(write(b'{"task_templates": [\n  {"taskname": "x",}\n]}'))
    assert str(caught.value) == \
        "tasks.json: invalid JSON at line 2 column 20: Expecting property name enclosed in double quotes"
    with pytest.raises(VLMError) as caught:
        load_task_file(write(b'{"task_templates": "caf\xe9"}'))  # \xe9 (Latin-1 e-acute) is byte 23
    assert str(caught.value) == "tasks.json: not UTF-8 text (byte 23)"


# ---- taskname ---------------------------------------------------------------------------------------


def test_taskname_rules(in_tmp):
    assert error_of(taskname=3) == "tasks.json: task_templates[0]: taskname: expected a string, got 3"
    assert error_of(taskname="my task") == \
        "tasks.json: task_templates[0]: taskname: 'my task' may only hold letters, digits, '_' and '-'"
    assert error_of(taskname="") == \
        "tasks.json: task_templates[0]: taskname: '' may only hold letters, digits, '_' and '-'"
    assert error_of(taskname="all") == \
        "tasks.json: task 'all': taskname: 'all' is reserved (it means every task); choose another name"
    with pytest.raises(VLMError) as caught:
        load_task_file(write({"task_templates": [without("taskname")]}))
    assert str(caught.value) == "tasks.json: task_templates[0]: missing required key 'taskname'"


@pytest.mark.parametrize("name", ["dialogue", "qa", "mt", "summarization", "nlg"])
def test_builtin_task_names_are_refused(in_tmp, name):
    assert error_of(taskname=name) == \
        f"tasks.json: task '{name}': taskname: '{name}' is a built-in task; choose another name"


def test_duplicate_taskname(in_tmp):
    other = {**SENTIMENT, "taskname": "other"}
    with pytest.raises(VLMError) as caught:
        load_task_file(write({"task_templates": [SENTIMENT, other, SENTIMENT]}))
    assert str(caught.value) == \
        "tasks.json: task 'sentiment': taskname: defined twice (task_templates[0] and task_templates[2])"


# ---- keys and types -----------------------------------------------------------------------------


def test_unknown_keys_are_named(in_tmp):
    assert error_of(answer_feild="label") == \
        "tasks.json: task 'sentiment': unknown key 'answer_feild' (did you mean 'answer_field'?)"
    assert error_of(colour="red") == \
        f"tasks.json: task 'sentiment': unknown key 'colour' (known keys: {', '.join(KNOWN_KEYS)})"


@pytest.mark.parametrize("key", ["prompt_template", "total_virtual_tokens", "virtual_token_splits",
                                 "answer_field"])
def test_missing_required_keys(in_tmp, key):
    with pytest.raises(VLMError) as caught:
        load_task_file(write({"task_templates": [without(key)]}))
    assert str(caught.value) == f"tasks.json: task 'sentiment': missing required key '{key}'"


@pytest.mark.parametrize("key, value, message", [
    ("prompt_template", 5, "prompt_template: expected a non-empty string, got 5"),
    ("prompt_template", "  ", 'prompt_template: expected a non-empty string, got "  "'),
    ("total_virtual_tokens", "10", 'total_virtual_tokens: expected a positive integer, got "10"'),
    ("total_virtual_tokens", 0, "total_virtual_tokens: expected a positive integer, got 0"),
    ("total_virtual_tokens", True, "total_virtual_tokens: expected a positive integer, got true"),
    ("max_seq_length", 2.5, "max_seq_length: expected a positive integer, got 2.5"),
    ("max_answer_tokens", -1, "max_answer_tokens: expected a positive integer, got -1"),
    ("virtual_token_splits", 10,
     "virtual_token_splits: expected a non-empty list of positive integers, got 10"),
    ("virtual_token_splits", [],
     "virtual_token_splits: expected a non-empty list of positive integers, got []"),
    ("virtual_token_splits", [10, 0],
     "virtual_token_splits: expected a non-empty list of positive integers, got [10, 0]"),
    ("truncate_field", 1, "truncate_field: expected a field name or null, got 1"),
    ("answer_field", None, "answer_field: expected a field name, got null"),
    ("answer_only_loss", "yes", 'answer_only_loss: expected true or false, got "yes"'),
    ("method", 3, "method: expected a non-empty string, got 3"),
    ("method", "", 'method: expected a non-empty string, got ""'),
    ("method_options", ["lr"], "method_options: expected an object of the method's options, got [\"lr\"]"),
    ("metric", 1, "metric: expected a string, got 1"),
    ("metric", "acc", "metric: unknown metric 'acc' (choose one of accuracy, intent_slot, exact_match, "
                      "token_f1, bleu, rouge, sacrebleu, f1)"),
    ("label_map", ["positivt"], 'label_map: expected an object of variant: label strings, got ["positivt"]'),
    ("label_map", {"positivt": 1}, "label_map: the label of 'positivt' must be a non-empty string, got 1"),
    ("label_map", {"positivt": " "},
     "label_map: the label of 'positivt' must be a non-empty string, got \" \""),
    ("label_map", {" ": "positive"}, "label_map: an empty variant (mapped to 'positive')"),
    ("label_map", {"Positivt": "positive", "positivt ": "negative"},
     "label_map: 'Positivt' and 'positivt ' are the same variant after lowercasing but map to 'positive' and "
     "'negative'"),
    ("stop", "\n", 'stop: expected a list of non-empty strings, got "\\n"'),
    ("stop", ["\n", ""], 'stop: expected a list of non-empty strings, got ["\\n", ""]'),
])
def test_wrong_types_and_values(in_tmp, key, value, message):
    assert error_of(**{key: value}) == f"tasks.json: task 'sentiment': {message}"


def test_label_map_variants_equal_after_lowercasing_may_agree(in_tmp):
    (task,) = load_one(label_map={"Positivt": "positive", "positivt": "Positive"}).values()
    assert task.label_map == {"Positivt": "positive", "positivt": "Positive"}


# ---- NeMo's rules -------------------------------------------------------------------------------


def test_splits_must_sum_to_the_total(in_tmp):
    assert error_of(prompt_template=TWO_MARKERS, virtual_token_splits=[7, 2], truncate_field=None) == \
        "tasks.json: task 'sentiment': virtual_token_splits: [7, 2] sums to 9, but total_virtual_tokens is 10"


@pytest.mark.parametrize("template, splits, message", [
    ("<|VIRTUAL_PROMPT_0|> {sentence} sentiment: {label}", [7, 3],
     "has 1 virtual-token marker but virtual_token_splits has 2 splits (one marker per split)"),
    ("{sentence} sentiment: {label}", [10],
     "has 0 virtual-token markers but virtual_token_splits has 1 split (one marker per split)"),
    ("<|VIRTUAL_PROMPT_1|> {sentence} <|VIRTUAL_PROMPT_0|> sentiment: {label}", [5, 5],
     "<|VIRTUAL_PROMPT_1|> where <|VIRTUAL_PROMPT_0|> was expected (markers are numbered 0, 1, ... in order, "
     "each once)"),
    ("<|VIRTUAL_PROMPT_0|> {sentence} <|VIRTUAL_PROMPT_0|> sentiment: {label}", [5, 5],
     "<|VIRTUAL_PROMPT_0|> appears more than once"),
    ("<|VIRTUAL_PROMPT_0|> {sentence} <|VIRTUAL_PROMPT_2|> sentiment: {label}", [5, 5],
     "<|VIRTUAL_PROMPT_2|> where <|VIRTUAL_PROMPT_1|> was expected (markers are numbered 0, 1, ... in order, "
     "each once)"),
    ("<|VIRTUAL_PROMPT|> {sentence} sentiment: {label}", [10],
     "malformed virtual-token marker '<|VIRTUAL_PROMPT|>' (expected <|VIRTUAL_PROMPT_0|>, "
     "<|VIRTUAL_PROMPT_1|>, ...)"),
    ("<|VIRTUAL_PROMPT_a|> {sentence} sentiment: {label}", [10],
     "malformed virtual-token marker '<|VIRTUAL_PROMPT_a|>' (expected <|VIRTUAL_PROMPT_0|>, "
     "<|VIRTUAL_PROMPT_1|>, ...)"),
])
def test_one_marker_per_split_in_order(in_tmp, template, splits, message):
    error = error_of(prompt_template=template, virtual_token_splits=splits)
    assert error == f"tasks.json: task 'sentiment': prompt_template: {message}"


@pytest.mark.parametrize("template, message", [
    ("<|VIRTUAL_PROMPT_0|> {first sentence} sentiment: {label}",
     "field name 'first sentence' in {first sentence} is not an identifier"),
    ("<|VIRTUAL_PROMPT_0|> {1st} sentiment: {label}", "field name '1st' in {1st} is not an identifier"),
    ("<|VIRTUAL_PROMPT_0|> {} sentiment: {label}", "field name '' in {} is not an identifier"),
    ("<|VIRTUAL_PROMPT_0|> {sentence} {{ sentiment: {label}",
     "unmatched '{' at character 32 (fields are written {name})"),
    ("<|VIRTUAL_PROMPT_0|> {sentence} sentiment} {label}",
     "unmatched '}' at character 41 (fields are written {name})"),
    ("<|VIRTUAL_PROMPT_0|> {sentence} {sentence} sentiment: {label}",
     "field {sentence} appears more than once"),
])
def test_template_fields(in_tmp, template, message):
    assert error_of(prompt_template=template) == f"tasks.json: task 'sentiment': prompt_template: {message}"


def test_truncate_field_must_be_a_field(in_tmp):
    assert error_of(truncate_field="sentense") == ("tasks.json: task 'sentiment': truncate_field: "
                                                   "unknown field 'sentense' "
                                                   "(the template's fields: sentence, label)")


@pytest.mark.parametrize("changes, message", [
    ({"answer_field": "labels"},
     "answer_field: unknown field 'labels' (the template's fields: sentence, label)"),
    ({"prompt_template": "<|VIRTUAL_PROMPT_0|> {label} is the sentiment of {sentence}"},
     "answer_field: {label} must end the template, but 'is the sentiment of' follows it"),
    ({"prompt_template": "<|VIRTUAL_PROMPT_0|> {label}{sentence}"},
     "answer_field: {label} must end the template, but {sentence} follows it"),
    ({"prompt_template": "<|VIRTUAL_PROMPT_0|> {sentence} sentiment: {label} <|VIRTUAL_PROMPT_1|>",
      "virtual_token_splits": [5, 5]},
     "answer_field: {label} must end the template, but <|VIRTUAL_PROMPT_1|> follows it"),
    ({"prompt_template": "<|VIRTUAL_PROMPT_0|> {sentence} sentiment: {label}.", "truncate_field": None},
     "answer_field: {label} must end the template, but '.' follows it"),
    ({"prompt_template": "<|VIRTUAL_PROMPT_0|> Classify: {sentence}", "answer_field": "sentence"},
     "answer_field: 'sentence' is also the truncate_field; the answer cannot be truncated"),
])
def test_answer_field_rules(in_tmp, changes, message):
    assert error_of(**changes) == f"tasks.json: task 'sentiment': {message}"


def test_the_answer_budget_must_leave_room_for_the_input(in_tmp):
    assert error_of(max_seq_length=40, max_answer_tokens=30) == (
        "tasks.json: task 'sentiment': max_answer_tokens: 30 answer tokens and 10 virtual tokens "
        "leave no room for the input within max_seq_length 40")
    (task,) = load_one(max_seq_length=41, max_answer_tokens=30).values()
    assert task.max_seq_length == 41
