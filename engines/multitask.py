"""Multi-task training of the Versatile Language Model on several tasks' data at once (what
train_vlm.py calls): the settings, a temperature-controlled multi-task batch sampler and the
training run, built from engines/training.py's engines, schedule, metrics file and checkpoints.

Default mode "adapter": each task's adapters (bottleneck from the task table) and its own
special-token rows train on a frozen GPT-2; the result is one multi-task adapter checkpoint.
Mode "full" (--no_adapter, as in the authors' train_vlm.py): all of GPT-2 trains on the mixed
data with no adapters, and the result is a full checkpoint (decoded with task id -1).

Task sampling: each epoch draws c_t examples of task t with c_t proportional to n_t^(1/T)
(n_t: the task's training examples, T: --temperature) and sum(c_t) = sum(n_t), so an epoch
always has the same size. T = 1 draws every example exactly once; T > 1 flattens the task
shares toward uniform (small tasks repeated, large ones subsampled); T = inf is uniform."""
import functools
import logging
import math
import os
import random
from datetime import datetime
from itertools import chain
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from engines.method_flags import method_tag, resolve_task_methods
from engines.specs import task_spec
from models.vlm import VersatileLM, backbone_fingerprint
from utils.data import collate, load_task_data, load_tokenizer, training_examples
from utils.errors import VLMError
from utils.tasks import TASKS, get_task, parse_dataset_paths
from engines.training import (RunPlan, add_virtual_positions, check_dataset_path, check_numbers, check_run_folder,
                              json_ready, template_meta, user_tasks,
                              make_loader, parse_fp16, run_distributed, train_run)

logger = logging.getLogger(__name__)

# The authors' train_vlm.py command: --train_batch_size=1 --gradient_accumulation_steps=16 --n_epochs 3.
DEFAULTS = {"train_batch_size": 1, "valid_batch_size": 1, "gradient_accumulation_steps": 16, "n_epochs": 3}
# Their script defaulted to 6.25e-5 for every run: right for full fine-tuning, while adapters and
# task embeddings start from scratch and train with 5e-4 in their single-task run.sh (qa, mt, summarization).
DEFAULT_LR = {"adapter": 5e-4, "full": 6.25e-5}
# The flags that decide the course of training: --resume refuses a run started with other values.
RESUME_SETTINGS = ("tasks", "task_file", "model_checkpoint", "dataset_paths", "no_adapter", "methods", "temperature", "mix_tasks",
                   "max_history", "train_batch_size", "gradient_accumulation_steps", "lr", "max_norm", "n_epochs",
                   "seed", "fp16")


# --- settings --------------------------------------------------------------------------------
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
            raise VLMError(f"--dataset_paths {name}={given[name]}: {name} is not in --tasks ({' '.join(tasks)})")
    return {task: given.get(task, get_task(task, user_tasks).default_dataset) for task in tasks}


def check_temperature(value):
    # inf is allowed: every task gets the same share (n^0 = 1).
    if value is None or math.isnan(value) or value <= 0:
        raise VLMError(f"--temperature must be a positive number (1: proportional to dataset size), got {value}")


def run_tag(args, mode):
    """adapter | full | the one method every task uses (lora, prefix+ln) | mixed."""
    if mode == "full":
        return "full"
    names = {"+".join(methods) for methods in args.methods.values()}
    if names == {"adapter"}:
        return "adapter"
    return method_tag(next(iter(args.methods.values()))) if len(names) == 1 else "mixed"


def default_output_dir(args, mode, now=None):
    """runs/<MonDD_HH-MM-SS>_VLM_multitask_<adapter|full|method|mixed>_<model>[_<tasks>]_T<T>_lr<lr>_ep<n>."""
    stamp = (now or datetime.now()).strftime("%b%d_%H-%M-%S")
    model = os.path.basename(os.path.normpath(args.model_checkpoint)) or "model"
    tasks = "" if len(args.tasks) == len(TASKS) else "_" + "-".join(args.tasks)
    return os.path.join("runs", f"{stamp}_VLM_multitask_{run_tag(args, mode)}_{model}{tasks}_T{args.temperature:g}"
                                f"_lr{args.lr:g}_ep{args.n_epochs}")


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
    if args.no_adapter and any(name in users for name in args.tasks):
        raise VLMError(f"--no_adapter: {', '.join(n for n in args.tasks if n in users)} are user tasks, which "
                       f"train their own method on the frozen backbone")
    args.methods = resolve_task_methods(args, {name: get_task(name, users).bottleneck for name in args.tasks},
                                        users) if mode == "adapter" else {}
    check_temperature(args.temperature)
    for name, value in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.lr is None:
        args.lr = DEFAULT_LR[mode]
    # max_history None means each task's own (dialogue 2, qa 1); check_numbers wants a number.
    check_numbers(SimpleNamespace(**dict(vars(args), max_history=args.max_history or 0)))
    parse_fp16(args.fp16)
    if not args.device:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.output_dir:
        if getattr(args, "resume", False):
            raise VLMError("--resume needs --output_dir: the folder of the run to continue")
        args.output_dir = default_output_dir(args, mode)
    check_run_folder(args)
    for task, path in args.dataset_paths.items():
        check_dataset_path(get_task(task, users), path, f"--dataset_paths {task}={path}")
    return mode


# --- task sampling ---------------------------------------------------------------------------
def task_shares(sizes, temperature):
    """{task: probability} with p_t proportional to n_t^(1/T)."""
    weights = {task: (n ** (1.0 / temperature) if n > 0 else 0.0) for task, n in sizes.items()}
    total = sum(weights.values())
    return {task: w / total for task, w in weights.items()}


def epoch_task_counts(sizes, temperature):
    """{task: examples drawn per epoch}: the temperature shares of sum(sizes), rounded by largest
    remainder (ties to the earlier task), so the counts are fixed and always add up to sum(sizes)."""
    if temperature == 1:  # exactly the data: no float rounding to reason about
        return dict(sizes)
    total = sum(sizes.values())
    quotas = {task: share * total for task, share in task_shares(sizes, temperature).items()}
    counts = {task: math.floor(q) for task, q in quotas.items()}
    order = sorted(quotas, key=lambda task: -(quotas[task] - counts[task]))  # stable: ties keep task order
    for task in order[:total - sum(counts.values())]:
        counts[task] += 1
    return counts


def draw(rng, size, count):
    """`count` indices out of range(size): without replacement when count <= size; otherwise every
    index count // size times plus a random subset, so repetitions are as even as possible."""
    full, rest = divmod(count, size) if size else (0, 0)
    return list(range(size)) * full + rng.sample(range(size), rest)


def length_grouped_batches(indices, lengths, batch_size, pool, rng):
    """Shuffle, sort pools of `pool` batches by length (less padding), cut into batches."""
    indices = list(indices)
    rng.shuffle(indices)
    pool_size = pool * batch_size
    indices = list(chain.from_iterable(sorted(indices[i:i + pool_size], key=lambda j: -lengths[j])
                                       for i in range(0, len(indices), pool_size)))
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


class MultiTaskBatchSampler(torch.utils.data.Sampler):
    """Batches of indices into the concatenation of several tasks' examples.

    lengths_by_task: {task: [example lengths]}, in the order the examples are concatenated.
    Each epoch (seeded by seed + epoch): draw epoch_task_counts() examples of every task (see
    draw()), then either group all draws by length into batches that mix tasks (mix_tasks=True)
    or group each task's draws separately, so every batch holds one task; finally shuffle the
    batch order. With num_replicas > 1 each process takes every num_replicas-th batch (equal counts)."""

    def __init__(self, lengths_by_task, batch_size, temperature=1.0, mix_tasks=True, seed=0, pool=50,
                 num_replicas=1, rank=0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        check_temperature(temperature)
        self.tasks = list(lengths_by_task)
        self.lengths = [n for task in self.tasks for n in lengths_by_task[task]]
        self.offsets, offset = {}, 0
        for task in self.tasks:
            self.offsets[task] = offset
            offset += len(lengths_by_task[task])
        self.sizes = {task: len(lengths_by_task[task]) for task in self.tasks}
        self.counts = epoch_task_counts(self.sizes, temperature)
        self.batch_size, self.temperature, self.mix_tasks = batch_size, temperature, mix_tasks
        self.seed, self.pool, self.num_replicas, self.rank = seed, pool, num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def task_of(self, index):
        """The task of a concatenated index."""
        for task in reversed(self.tasks):
            if index >= self.offsets[task]:
                return task
        raise IndexError(index)

    def _all_batches(self):
        rng = random.Random(self.seed + self.epoch)
        drawn = {task: [self.offsets[task] + i for i in draw(rng, self.sizes[task], self.counts[task])]
                 for task in self.tasks}
        if self.mix_tasks:
            batches = length_grouped_batches(chain.from_iterable(drawn.values()), self.lengths, self.batch_size,
                                             self.pool, rng)
        else:
            batches = [b for task in self.tasks
                       for b in length_grouped_batches(drawn[task], self.lengths, self.batch_size, self.pool, rng)]
        rng.shuffle(batches)
        return batches

    def _batch_count(self):
        if self.mix_tasks:
            return -(-sum(self.counts.values()) // self.batch_size)
        return sum(-(-count // self.batch_size) for count in self.counts.values())

    def __iter__(self):
        batches = self._all_batches()
        per_replica = len(batches) // self.num_replicas
        return iter(batches[self.rank::self.num_replicas][:per_replica])

    def __len__(self):
        return self._batch_count() // self.num_replicas


# --- data ------------------------------------------------------------------------------------
def load_all_tasks(args, tokenizer, users):
    """{task: tokenized training and validation splits}; every file is checked before any model loads."""
    data = {}
    for name in args.tasks:
        task = get_task(name, users)
        data[name] = load_task_data(task, args.dataset_paths[name], tokenizer, splits=list(dict.fromkeys(task.splits)),
                                    cache_prefix=args.dataset_cache)
    return data


def task_examples(args, data, max_positions, users, virtual_tokens=None):
    """{task: (train examples, validation examples)}, every example tagged with its task_id
    (collate() reads it per row, so one batch can hold several tasks) and led by its task's
    virtual-token positions (`virtual_tokens`: {task: count}, prompt and p-tuning methods)."""
    examples = {}
    for name in args.tasks:
        task, path = get_task(name, users), args.dataset_paths[name]
        max_history = task.max_history if args.max_history is None else args.max_history
        n_virtual = (virtual_tokens or {}).get(name, 0)
        train_split, valid_split = task.splits
        pair = []
        for split in (train_split, valid_split):
            split_examples = training_examples(task, data[name][split], max_history,
                                               max_positions=max_positions - n_virtual, where=f"{path} split {split!r}")
            split_examples = add_virtual_positions(split_examples, n_virtual)
            for example in split_examples:
                example["task_id"] = task.task_id
            pair.append(split_examples)
        examples[name] = tuple(pair)
    return examples


def make_multitask_loaders(examples, args, world_size=1, rank=0):
    """(training loader over all tasks, {task: validation loader}). Validation: each process takes
    every world_size-th example of each task, so the summed NLL covers the whole split."""
    train = [e for name in args.tasks for e in examples[name][0]]
    sampler = MultiTaskBatchSampler({name: [len(e["input_ids"]) for e in examples[name][0]] for name in args.tasks},
                                    args.train_batch_size, args.temperature, args.mix_tasks, seed=args.seed,
                                    num_replicas=world_size, rank=rank)
    # task_id=None: never used, every example carries its own.
    train_loader = DataLoader(train, batch_sampler=sampler, collate_fn=functools.partial(collate, task_id=None))
    if len(train_loader) == 0:
        raise VLMError(f"{len(train)} training examples make no batch of {args.train_batch_size} "
                       f"for each of {world_size} processes")
    valid_loaders = {}
    for name in args.tasks:
        valid = examples[name][1]
        if len(valid) < world_size:
            raise VLMError(f"{args.dataset_paths[name]}: {len(valid)} validation examples for {world_size} processes")
        valid_loaders[name] = make_loader(valid[rank::world_size], valid[0]["task_id"], args.valid_batch_size,
                                          shuffle=False)
    return train_loader, valid_loaders


# --- the run ---------------------------------------------------------------------------------
def run_multitask(args):
    """Train on all of args.tasks at once as train_vlm.py's flags say; returns a
    engines.training.TrainResult (the in-memory model, unwrapped; metrics on rank 0 only)."""
    mode = prepare_multitask_args(args)
    fp16 = parse_fp16(args.fp16)
    return run_distributed(args.device, fp16, lambda device: train_run(
        args, device, fp16, RESUME_SETTINGS, lambda world_size, rank: multitask_plan(args, mode, world_size, rank)))


def multitask_plan(args, mode, world_size, rank):
    """train_vlm.py's RunPlan: every task's data in one sampler; each task's methods and rows on a
    frozen backbone (mode adapter) or all of GPT-2 (full, rows decoded as plain GPT-2)."""
    tokenizer = load_tokenizer(args.model_checkpoint)
    users = user_tasks(args)
    data = load_all_tasks(args, tokenizer, users)  # bad data files stop here, before the model loads
    specs = [task_spec(get_task(name, users), args.methods[name]) for name in args.tasks] if mode == "adapter" else []
    model = VersatileLM.from_pretrained(args.model_checkpoint, specs)
    fingerprint = backbone_fingerprint(model.gpt2) if mode == "adapter" else None
    virtual = {name: model.tasks[name].num_virtual_tokens for name in args.tasks if name in model.tasks}
    examples = task_examples(args, data, model.config.n_positions, users, virtual)
    train_loader, valid_loaders = make_multitask_loaders(examples, args, world_size, rank)
    sampler = train_loader.batch_sampler

    def describe(device):
        for name in args.tasks:
            logger.info("%s: %d training examples, %d drawn per epoch; %d validation examples%s", name,
                        sampler.sizes[name], sampler.counts[name], len(examples[name][1]),
                        f"; {method_tag(args.methods[name])}" if mode == "adapter" else "")
        logger.info("%d batches per epoch and process (%s, temperature %g); mode %s on %s%s", len(train_loader),
                    "tasks mixed in batches" if args.mix_tasks else "one task per batch", args.temperature, mode,
                    device, f" x {world_size} processes" if world_size > 1 else "")
        for name in (n for n, count in sampler.counts.items() if count == 0):
            logger.warning("%s: temperature %g draws none of its examples per epoch", name, args.temperature)

    extra = {"training_args": json_ready(args),
             "multitask": {"tasks": list(args.tasks), "temperature": args.temperature, "mix_tasks": args.mix_tasks,
                           "examples_per_epoch": dict(sampler.counts)}}
    # A batch need not hold every task, so under DDP some tasks' modules get no gradient in a step.
    return RunPlan(model, tokenizer, mode, list(args.tasks), mode, fingerprint, train_loader, valid_loaders,
                   use_task_ids=mode == "adapter", extra=extra, per_task_metrics=True,
                   find_unused_parameters=mode == "adapter", describe=describe,
                   task_meta=template_meta([get_task(name, users) for name in args.tasks]))
