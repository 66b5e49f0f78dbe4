"""TaskSpecs, what the model knows of a task, from the task table (and user task files)."""
from models.vlm import TaskSpec
from utils.errors import VLMError
from utils.tasks import TASKS, get_task
from utils.vocab import builtin_token_ids


def builtin_spec(name, methods=None):
    """The TaskSpec of a built-in task: its table id, its own special-token rows, these methods."""
    task = get_task(name)
    return TaskSpec(task.name, task.task_id, builtin_token_ids(task.name), dict(methods or {}))


def task_spec(task, methods=None):
    """The TaskSpec of any task: a built-in one (its table id and rows) or a user task (its id, no rows)."""
    if task.layout == "template":
        return TaskSpec(task.name, task.task_id, (), dict(methods or {}))
    return builtin_spec(task.name, methods)


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
                    raise VLMError(f"{where}: task {name!r}: {key} is {new.get(key)!r}, but the task was trained "
                                   f"with {meta['template'].get(key)!r}; retrain it or keep its template")
            meta["template"] = new
        updated[name] = meta
    return updated
