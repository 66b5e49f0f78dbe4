"""What a server holds: its tasks by name (each a task object of tasks/, its id in the model and
what decoding needs of its modules), the prompts of requests, and task modules read from
checkpoints while it runs (POST /admin/tasks).

The table is a snapshot: the decoding loop (engines/serve_engine.py) publishes a new one after
every change, and request handlers read whichever is current, never the model itself.
"""

import os
from dataclasses import dataclass

import torch

from engines.cli import known_user_tasks
from engines.generate import with_virtual_positions
from models.checkpoint import CONFIG_NAME, load_method_tensors, task_specs
from models.combine import load_task_checkpoint
from models.vlm import TaskSpec
from tasks.plain import PlainTextTask
from tasks.table import get_task
from tasks.task_file import recorded_user_tasks
from utils.errors import VLMError


@dataclass(frozen=True)
class ServedTask:
    task: object  # the tasks/ object: input layouts, stop tokens, output text
    task_id: int  # the rows' id in the model (-1: the backbone alone)
    methods: tuple  # method names, in application order
    virtual_tokens: int  # virtual tokens in front of a prompt (prompt, p-tuning)
    prefix_tokens: int  # prefix-tuning columns in front of the cache
    version: int = 0  # bumped when the task is replaced: queued prompts are rebuilt

    @property
    def name(self):
        return self.task.name


def served_task(model, task, version=0):
    """The ServedTask of a task object over the model (modules read from the model's TaskModule)."""
    module = model.tasks[task.name] if task.name in model.tasks else None
    methods = tuple(module.methods) if module is not None else ()
    prefix = sum(m.prefix_length for m in module.methods.values() if m.adds_prefix()) if module else 0
    return ServedTask(
        task,
        model.task_id(task.name),
        methods,
        module.num_virtual_tokens if module is not None else 0,
        prefix,
        version,
    )


def backbone_name(model_checkpoint, config):
    """The name the backbone alone is served under: its hub name, or its folder's name."""
    base = (config or {}).get("base_model") or model_checkpoint
    return os.path.basename(os.path.normpath(str(base))) or "gpt2"


def initial_tasks(model, config, args):
    """{name: ServedTask} of a loaded checkpoint: every task it holds, plus the backbone alone."""
    user_tasks = known_user_tasks(args, config)
    served = {}
    for name in (config or {}).get("tasks", {}):
        served[name] = served_task(model, get_task(name, user_tasks))
    base = PlainTextTask(backbone_name(args.model_checkpoint, config))
    if base.name not in served:
        served[base.name] = served_task(model, base)
    return served


def build_prompt(served, item, tokenizer, n_positions, where):
    """The Prompt of one input (text or an object of the task's fields), as evaluate.py --input
    builds it, with virtual-token positions; a VLMError names `where` when it does not fit."""
    task = served.task
    prompt = task.input_prompt(item, tokenizer, task.max_history, served.task_id, where)
    prompt = with_virtual_positions(None, [prompt], counts={served.task_id: served.virtual_tokens})[0]
    if len(prompt.input_ids) >= n_positions:
        raise VLMError(
            f"{where}: the input takes {len(prompt.input_ids)} tokens; the model has only "
            f"{n_positions} positions (the prompt and at least one new token must fit)"
        )
    return prompt


# --- admin: task modules from checkpoint folders ----------------------------------------------------
@dataclass
class LoadedTask:
    """A task module built from a checkpoint, ready for the decoding loop to attach."""

    task: object  # tasks/ object
    module: object  # TaskModule, not yet in the model
    rows: object  # (n, d) tensor of its special-token rows, or None


def check_under_root(path, root):
    """The checkpoint folder's real path, which must lie inside --admin_root (links resolved)."""
    if not isinstance(path, str) or not path:
        raise VLMError("checkpoint: give the path of a task checkpoint folder")
    real_root = os.path.realpath(root)
    real = os.path.realpath(path if os.path.isabs(path) else os.path.join(real_root, path))
    if os.path.commonpath([real, real_root]) != real_root:
        raise PermissionError(f"checkpoint: {path} is outside the server's --admin_root")
    return real


def load_tasks_from_checkpoint(model, fingerprint, path):
    """[LoadedTask] of a task-module checkpoint folder, checked against the served backbone.
    Only JSON and safetensors are read; any problem is one VLMError naming the file."""
    checkpoint = load_task_checkpoint(path)
    if checkpoint.fingerprint != fingerprint:
        raise VLMError(
            f"{path}: its task modules were trained on another backbone than the one served "
            f"(fingerprint {checkpoint.fingerprint[:12]}, served {fingerprint[:12]})"
        )
    where = os.path.join(path, CONFIG_NAME)
    user_tasks = recorded_user_tasks(checkpoint.config, where)
    loaded = []
    for spec in task_specs(checkpoint.config, where):
        task = get_task(spec.name, user_tasks)
        tensors = checkpoint.task_tensors(spec.name)
        module = model.build_task(TaskSpec(spec.name, 0, spec.token_ids, spec.methods))
        with torch.no_grad():
            load_method_tensors(module, tensors)
        module.eval()
        rows = tensors.get(f"task_embeddings.{spec.name}")
        loaded.append(LoadedTask(task, module, rows))
    return loaded


def attach_loaded(model, loaded, version):
    """Put a LoadedTask in the model under a free id (replacing a task of the same name is the
    caller's: it removes that one first); returns its ServedTask. Runs in the decoding loop."""
    module = loaded.module
    module.task_id = model.next_task_id()
    model.attach_task(module)
    if loaded.rows is not None:
        wte = model.gpt2.get_input_embeddings().weight
        with torch.no_grad():
            wte[list(module.token_ids)] = loaded.rows.to(wte)
    return served_task(model, loaded.task, version)
