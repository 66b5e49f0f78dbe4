"""Checking and completing the flags of a training run, before anything heavy starts: the
training mode, the task table's defaults, numbers, devices, the run folder, dataset paths, and the
flags --resume must find unchanged. One preparation serves train.py (`prepare_args`, one task)
and train_vlm.py (`prepare_multitask_args`, several)."""
import math
import os
from datetime import datetime
from types import SimpleNamespace

import torch

from engines.method_flags import method_tag, resolve_methods, resolve_task_methods, resolve_user_task_methods
from engines.pruning import check_pruning_args
from engines.run_state import CHECKPOINT_PREFIX, TRAINING_STATE, latest_complete_checkpoint
from engines.sampling import check_temperature
from tasks.table import TASKS, get_task, parse_dataset_paths
from tasks.task_file import load_task_file
from utils.errors import VLMError

FP16_LEVELS = ("O0", "O1", "O2", "O3")  # apex opt levels, accepted as the authors' --fp16 values
# The flags that decide the course of training: --resume refuses a run started with other values.
RESUME_SETTINGS = ("task", "task_file", "model_checkpoint", "dataset_path", "adapter_bottleneck", "methods",
                   "emb_only", "outputlayer_only", "random_init", "distillation", "max_history",
                   "train_batch_size", "gradient_accumulation_steps", "lr", "max_norm", "n_epochs", "seed",
                   "fp16", "sparsity", "prune", "snip_batches")
MULTITASK_RESUME_SETTINGS = ("tasks", "task_file", "model_checkpoint", "dataset_paths", "no_adapter",
                             "methods", "temperature", "mix_tasks", "max_history", "train_batch_size",
                             "gradient_accumulation_steps", "lr", "max_norm", "n_epochs", "seed", "fp16",
                             "sparsity", "prune", "snip_batches")
# The authors' train_vlm.py command: --train_batch_size=1 --gradient_accumulation_steps=16 --n_epochs 3.
DEFAULTS = {"train_batch_size": 1, "valid_batch_size": 1, "gradient_accumulation_steps": 16, "n_epochs": 3}
# Their script defaulted to 6.25e-5 for every run: right for full fine-tuning, while adapters and
# task embeddings start from scratch and train with 5e-4 in their single-task run.sh (qa, mt, summarization).
DEFAULT_LR = {"adapter": 5e-4, "full": 6.25e-5}


def training_mode(args, task=None):
    """full | adapter | emb_only | outputlayer_only, after checking the flags combine. "adapter"
    means per-task modules on a frozen backbone: the methods of --method (or the authors' adapter
    for --adapter_bottleneck B alone), resolved into args.methods ({method: options})."""
    if args.adapter_bottleneck is None or args.adapter_bottleneck < 0:
        raise VLMError(f"--adapter_bottleneck must be 0 (full fine-tuning) or positive, "
                       f"got {args.adapter_bottleneck}")
    if args.emb_only and args.outputlayer_only:
        raise VLMError("--emb_only and --outputlayer_only exclude each other; choose one")
    method = getattr(args, "method", None)
    if task is not None and task.method_from_task_file:
        for flag, given in (("--emb_only", args.emb_only), ("--outputlayer_only", args.outputlayer_only),
                            ("--random_init", args.random_init)):
            if given:
                raise VLMError(f"{flag}: task {task.name} is a user task; it trains its task file's method "
                               f"(or --method) on the frozen backbone")
        args.methods = resolve_user_task_methods(args, task)
        return "adapter"
    if (args.adapter_bottleneck > 0 or method) and (args.emb_only or args.outputlayer_only):
        flag = "--emb_only" if args.emb_only else "--outputlayer_only"
        drop = f"--method {method}" if method else f"--adapter_bottleneck {args.adapter_bottleneck}"
        raise VLMError(f"{flag} trains no per-task modules; drop {drop}")
    args.methods = resolve_methods(args, task.bottleneck if task is not None else 100) \
        if hasattr(args, "method") or args.adapter_bottleneck > 0 else {}
    mode = ("adapter" if args.methods else "emb_only" if args.emb_only
            else "outputlayer_only" if args.outputlayer_only else "full")
    if args.random_init and mode in ("adapter", "emb_only"):
        flag = ("--method" if method else "--adapter_bottleneck") if mode == "adapter" else "--emb_only"
        raise VLMError(f"--random_init trains a backbone from scratch; it cannot be combined with "
                       f"{flag}, which keep the backbone frozen")
    return mode


def fill_task_defaults(args, task, mode):
    """Flags left at None take the task table's values (the authors' run.sh)."""
    hyper = task.adapter if mode in ("adapter", "emb_only") else task.full_finetune
    defaults = {"dataset_path": task.default_dataset, "max_history": task.max_history,
                "train_batch_size": hyper.train_batch_size,
                "gradient_accumulation_steps": hyper.gradient_accumulation_steps,
                "n_epochs": hyper.n_epochs, "lr": hyper.lr}
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if getattr(args, "valid_batch_size", None) is None:
        args.valid_batch_size = args.train_batch_size


def check_numbers(args):
    checks = [("n_epochs", args.n_epochs >= 0, "must be 0 or more"),
              ("train_batch_size", args.train_batch_size >= 1, "must be at least 1"),
              ("valid_batch_size", args.valid_batch_size >= 1, "must be at least 1"),
              ("gradient_accumulation_steps", args.gradient_accumulation_steps >= 1, "must be at least 1"),
              ("max_history", args.max_history >= 0, "must be 0 or more"),
              ("lr", math.isfinite(args.lr) and args.lr > 0, "must be a positive number"),
              ("max_norm", math.isfinite(args.max_norm) and args.max_norm > 0, "must be a positive number")]
    for name, ok, message in checks:
        if not ok:
            raise VLMError(f"--{name} {message}, got {getattr(args, name)}")


def mode_tag(args, mode):
    tag = {"adapter": method_tag(getattr(args, "methods", {})) or "adapter", "emb_only": "emb_only",
           "outputlayer_only": "outputlayer_only", "full": "full"}[mode]
    return ("random_" + tag) if args.random_init else tag


def default_output_dir(args, mode, now=None):
    """A new run folder named like the authors' log dirs, lr and epochs last:
    train.py
        runs/<MonDD_HH-MM-SS>_<model>_<task>_<adapterB|full|...>_lr<lr>_ep<n>
    train_vlm.py
        runs/<MonDD_HH-MM-SS>_VLM_multitask_<adapter|full|method|mixed>_<model>[_<tasks>]_T<T>_lr<lr>_ep<n>"""
    stamp = (now or datetime.now()).strftime("%b%d_%H-%M-%S")
    model = os.path.basename(os.path.normpath(args.model_checkpoint)) or "model"
    if hasattr(args, "tasks"):
        tasks = "" if len(args.tasks) == len(TASKS) else "_" + "-".join(args.tasks)
        name = f"VLM_multitask_{run_tag(args, mode)}_{model}{tasks}_T{args.temperature:g}"
    else:
        name = f"{model}_{args.task}_{mode_tag(args, mode)}"
    return os.path.join("runs", f"{stamp}_{name}_lr{args.lr:g}_ep{args.n_epochs}")


def check_output_dir(path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise VLMError(f"--output_dir {path}: exists and is not a folder")
    if os.path.isdir(path) and os.listdir(path):
        raise VLMError(f"--output_dir {path}: folder is not empty; choose a new one")


def user_tasks(args):
    """{name: TemplateTask} of --task_file (none without it)."""
    return load_task_file(args.task_file) if getattr(args, "task_file", None) else {}


def prepare_args(args):
    """Check and complete parsed arguments in place; returns (task, mode). No file is written."""
    task = get_task(args.task, user_tasks(args))
    mode = training_mode(args, task)
    check_pruning_args(args, mode)
    fill_task_defaults(args, task, mode)
    check_numbers(args)
    check_run_settings(args, mode, {task: (args.dataset_path, None)})
    return task, mode


def check_run_settings(args, mode, datasets):
    """What train.py and train_vlm.py check alike once the flags are complete: --fp16, the device,
    the run folder (named by default; with --resume it must exist), then each task's dataset
    (`datasets`: {task: (path, how errors name it or None)})."""
    parse_fp16(args.fp16)
    if not args.device:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.output_dir:
        if getattr(args, "resume", False):
            raise VLMError("--resume needs --output_dir: the folder of the run to continue")
        args.output_dir = default_output_dir(args, mode)
    check_run_folder(args)
    for task, (path, shown) in datasets.items():
        task.check_dataset_path(path, shown)


def parse_fp16(value):
    """The authors' --fp16 took an apex opt level ('' = off). O0 is apex's pure fp32; O1-O3 -> autocast."""
    if value in ("", None, "O0"):
        return False
    if value not in FP16_LEVELS:
        raise VLMError(f"--fp16: expected '' (off) or an apex opt level {'/'.join(FP16_LEVELS)}, "
                       f"got {value!r}")
    return True


def check_run_folder(args):
    """--output_dir for a new run must be new or empty; for --resume it must hold a complete checkpoint."""
    if getattr(args, "resume", False):
        if latest_complete_checkpoint(args.output_dir) is None:
            raise VLMError(f"--resume: no complete {CHECKPOINT_PREFIX}<N>/ checkpoint "
                           f"(with {TRAINING_STATE}) in --output_dir {args.output_dir}")
    else:
        check_output_dir(args.output_dir)


def parse_tasks(names, user_tasks=None):
    """Task names (--tasks) -> names in the task table's order, then user tasks in their task
    file's order; unknown or repeated names fail."""
    names = list(names or [])
    known = list(TASKS) + list(user_tasks or {})
    if not names:
        raise VLMError("--tasks: name at least one task")
    for name in names:
        if name not in known:
            hint = "" if user_tasks else " (a user task needs --task_file FILE)"
            raise VLMError(f"--tasks: unknown task {name!r}; choose from {', '.join(known)}{hint}")
        if names.count(name) > 1:
            raise VLMError(f"--tasks: {name} is given twice")
    # One canonical order, so `--tasks nlg mt` and `--tasks mt nlg` draw the same batches.
    return [name for name in known if name in names]


def task_dataset_paths(items, tasks, user_tasks=None):
    """--dataset_paths task=PATH ... -> {task: path} for every task in `tasks` (table default
    for those not given; a user task's folder must be given); a path for a task that is not
    trained fails."""
    given = parse_dataset_paths(items, user_tasks)
    for name in given:
        if name not in tasks:
            raise VLMError(f"--dataset_paths {name}={given[name]}: "
                           f"{name} is not in --tasks ({' '.join(tasks)})")
    return {task: given.get(task, get_task(task, user_tasks).default_dataset) for task in tasks}


def run_tag(args, mode):
    """adapter | full | the one method every task uses (lora, prefix+ln) | mixed."""
    if mode == "full":
        return "full"
    names = {"+".join(methods) for methods in args.methods.values()}
    if names == {"adapter"}:
        return "adapter"
    return method_tag(next(iter(args.methods.values()))) if len(names) == 1 else "mixed"


def prepare_multitask_args(args):
    """Check and complete parsed train_vlm.py arguments in place; returns the mode ('adapter' or
    'full'). Nothing is written. args.tasks becomes a list in table order, args.dataset_paths a dict."""
    mode = "full" if args.no_adapter else "adapter"
    users = user_tasks(args)
    args.tasks = parse_tasks(args.tasks, users)
    args.dataset_paths = task_dataset_paths(args.dataset_paths, args.tasks, users)
    if args.no_adapter and args.method:
        raise VLMError(f"--no_adapter fine-tunes all of GPT-2 with no per-task modules; drop --method "
                       f"{' '.join(args.method)}")
    # {task: {method: options}}; checked even with --no_adapter, so stray option flags fail
    own_method = [name for name in args.tasks if get_task(name, users).method_from_task_file]
    if args.no_adapter and own_method:
        raise VLMError(f"--no_adapter: {', '.join(own_method)} are user tasks, which "
                       f"train their own method on the frozen backbone")
    args.methods = resolve_task_methods(args, {name: get_task(name, users).bottleneck for name in args.tasks},
                                        users) if mode == "adapter" else {}
    check_pruning_args(args, mode)
    check_temperature(args.temperature)
    for name, value in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.lr is None:
        args.lr = DEFAULT_LR[mode]
    # max_history None means each task's own (dialogue 2, qa 1); check_numbers wants a number.
    check_numbers(SimpleNamespace(**dict(vars(args), max_history=args.max_history or 0)))
    check_run_settings(args, mode, {get_task(name, users): (path, f"--dataset_paths {name}={path}")
                                    for name, path in args.dataset_paths.items()})
    return mode
