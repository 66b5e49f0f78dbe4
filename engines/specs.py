"""TaskSpecs, what the model knows of a task, from the task table (and user task files)."""
from models.vlm import TaskSpec
from utils.tasks import TASKS, get_task
from utils.vocab import builtin_token_ids


def builtin_spec(name, methods=None):
    """The TaskSpec of a built-in task: its table id, its own special-token rows, these methods."""
    task = get_task(name)
    return TaskSpec(task.name, task.task_id, builtin_token_ids(task.name), dict(methods or {}))


def adapter_specs(bottlenecks):
    """{task: bottleneck} -> TaskSpecs with the authors' adapter (bottleneck 0: task embeddings only)."""
    return [builtin_spec(t, {"adapter": {"bottleneck": b}} if b > 0 else {}) for t, b in bottlenecks.items()
            if t in TASKS]
