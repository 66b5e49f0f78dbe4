"""The task package's contracts: every kind implements the one interface, every task's references
have the form its metrics read, the metric registry is the one place task files and the table
name metrics from, and methods say themselves whether they add virtual tokens or prefixes."""
import os

import pytest
from conftest import REPO

from models.methods import METHODS, method_class
from tasks.base import BuiltinTask, TaskKind
from tasks.metrics import METRICS, TEXT_METRICS
from tasks.table import TASKS
from tasks.task_file import load_task_file
from tasks.template import TemplateTask

SAMPLES = os.path.join(REPO, "data", "samples")
TASK_FILE = os.path.join(REPO, "data", "tasks", "nemo_article.json")
INTERFACE = [name for name, value in vars(TaskKind).items() if callable(value) and not name.startswith("_")]
KIND_HOOKS = ["check_fields", "iter_contexts", "build_inputs", "input_context"]


def user_tasks():
    return load_task_file(TASK_FILE)


def all_tasks():
    return list(TASKS.values()) + list(user_tasks().values())


@pytest.mark.parametrize("task", all_tasks(), ids=lambda t: t.name)
def test_every_task_implements_the_interface(task):
    assert isinstance(task, TaskKind)
    for name in INTERFACE:
        assert callable(getattr(task, name)), name
    # what TaskKind leaves abstract, each kind implements (a built-in kind also its layout hooks)
    abstract = [name for name in INTERFACE if _raises_not_implemented(getattr(TaskKind, name))]
    assert {"load_data", "training_examples", "dataset_prompts", "input_prompt", "output_text",
            "write_outputs", "distilled_path", "distillation_job"} <= set(abstract)
    hooks = abstract + (KIND_HOOKS if isinstance(task, BuiltinTask) else [])
    for name in hooks:
        assert getattr(type(task), name) is not getattr(TaskKind, name, None), name
        if name in KIND_HOOKS:
            assert getattr(type(task), name) is not getattr(BuiltinTask, name), name


def _raises_not_implemented(function):
    code = function.__code__
    return "NotImplementedError" in code.co_names


def test_every_metric_a_task_names_is_registered_and_task_files_offer_the_text_ones():
    for task in TASKS.values():
        assert set(task.metrics) <= set(METRICS), task.name
    assert TEXT_METRICS == ("accuracy", "intent_slot", "exact_match", "token_f1", "bleu", "rouge",
                            "sacrebleu", "f1")
    assert [name for name, m in METRICS.items() if m.teacher_forced] == ["ppl"]
    assert TASKS["dialogue"].teacher_forced and not TASKS["mt"].teacher_forced


REFERENCE_FORMS = {
    "text": lambda r: isinstance(r, str),
    "texts": lambda r: isinstance(r, list) and r and all(isinstance(x, str) for x in r),
    "coqa": lambda r: (isinstance(r, dict) and set(r) == {"id", "turn_id", "answer"}
                       and isinstance(r["answer"], str)),
}


@pytest.mark.parametrize("name", list(TASKS) + ["sentiment", "intent_and_slot"])
def test_references_have_the_form_each_metric_reads_and_gold_outputs_score_perfectly(name, tokenizer):
    task = TASKS.get(name) or user_tasks()[name]
    path = os.path.join(SAMPLES, name if name in ("sentiment", "intent_and_slot") else f"{name}.json")
    records = task.load_data(path, tokenizer, [task.test_split])[task.test_split]
    prompts = task.dataset_prompts(records, task.max_history, tokenizer, task.task_id)
    references = task.references(prompts)
    assert len(references) == len(prompts) > 0
    scored = [m for m in task.metrics if not METRICS[m].teacher_forced]
    assert scored
    for metric in scored:
        form = METRICS[metric].references
        assert all(REFERENCE_FORMS[form](r) for r in references), (name, metric)
    # the gold text as the output: every metric at its best where a perfect answer has one value
    gold = [r if isinstance(r, str) else r[0] if isinstance(r, list) else r["answer"] for r in references]
    perfect = {"exact_match": {"exact_match": 1.0}, "accuracy": {"accuracy": 1.0},
               "token_f1": {"token_f1": 1.0}, "f1": {"f1": 1.0}, "bleu": {"bleu": 100.0},
               "sacrebleu": {"sacrebleu": 100.0},
               "coqa": {"f1": 100.0, "em": 100.0, "turns": len(references)}}
    options = task.metric_options()
    for metric in scored:
        result = METRICS[metric].score(gold, references, **options)
        if metric in perfect:
            assert result == pytest.approx(perfect[metric]), (name, metric, result)
    keys = {k for m in scored for k in METRICS[m].score(gold, references, **options)}
    assert set(task.score(gold, prompts)) == keys


def test_methods_say_whether_they_add_virtual_tokens_or_prefixes():
    virtual = {name for name in METHODS if method_class(name).adds_virtual_tokens()}
    prefix = {name for name in METHODS if method_class(name).adds_prefix()}
    assert virtual == {"prompt", "ptuning"}
    assert prefix == {"prefix", "unipelt"}
    for name in METHODS:
        cls = method_class(name)
        options = cls.resolve({"bottleneck": 7} if name == "adapter" else {})
        expected = options["length"] if name in virtual else 0
        assert cls.virtual_token_count(options) == expected


def test_a_user_task_owns_no_rows_and_records_its_template(tokenizer):
    task = user_tasks()["sentiment"]
    assert isinstance(task, TemplateTask) and task.method_from_task_file
    assert task.vocab_token_ids() == () and task.checkpoint_meta() == {"template": task.as_json()}
    assert TASKS["mt"].checkpoint_meta() == {} and not TASKS["mt"].method_from_task_file
    assert len(task.banned_ids()) == 30 and len(TASKS["mt"].banned_ids()) == 26
