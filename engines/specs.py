"""TaskSpecs, what the model knows of a task, from the task table (and user task files)."""
from models.vlm import TaskSpec
from tasks.table import TASKS, get_task
from utils.errors import VLMError


def builtin_spec(name, methods=None):
    """The TaskSpec of a built-in task: its table id, its own special-token rows, these methods."""
    return task_spec(get_task(name), methods)


def task_spec(task, methods=None):
    """The TaskSpec of any task: its id, the embedding rows it owns (a built-in task's special
    tokens; none for a user task) and these methods."""
    return TaskSpec(task.name, task.task_id, tuple(task.vocab_token_ids()), dict(methods or {}))


def adapter_specs(bottlenecks):
    """{task: bottleneck} -> TaskSpecs with the authors' adapter (bottleneck 0: task embeddings only)."""
    return [builtin_spec(t, {"adapter": {"bottleneck": b}} if b > 0 else {}) for t, b in bottlenecks.items()
            if t in TASKS]


# What a user task's trained tensors depend on: a task file may change anything else of a recorded
# template (metric, label map, stop rule, lengths) when tasks are combined.
TRAINED_TEMPLATE_KEYS = ("prompt_template", "total_virtual_tokens", "virtual_token_splits", "truncate_field",
                         "answer_field", "answer_only_loss")


def refresh_templates(task_meta, user_tasks, where):
    """task_meta ({task: config entries}) with the templates of `user_tasks` (--task_file) in place
    of the recorded ones; a template that differs in what training depended on is an error."""
    updated = {}
    for name, meta in task_meta.items():
        meta = dict(meta)
        if "template" in meta and name in user_tasks:
            new = user_tasks[name].as_json()
            for key in TRAINED_TEMPLATE_KEYS:
                if new.get(key) != meta["template"].get(key):
                    raise VLMError(f"{where}: task {name!r}: {key} is {new.get(key)!r}, "
                                   f"but the task was trained with {meta['template'].get(key)!r}; "
                                   "retrain it or keep its template")
            meta["template"] = new
        updated[name] = meta
    return updated
