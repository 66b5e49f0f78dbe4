"""The reusable pieces of training with pytorch-ignite: settings checks, devices and seeds, data
loaders, the trainer and evaluator engines, the learning-rate schedule, per-epoch checkpoints
(written whole or not at all, with the training state --resume continues from), the metrics file
and the run of one task (`run_training`, what train.py calls).

The trainer follows the authors' train.py: AdamW (no weight decay) over the trainable parameters,
the learning rate falling linearly from --lr to 0 over all iterations, the loss divided by the
accumulation steps, gradients clipped to --max_norm, a step every --gradient_accumulation_steps
iterations. Validation is the exact token-level mean NLL over the whole validation split."""
import contextlib
import functools
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

import ignite.distributed as idist
from ignite.engine import Engine, Events
from ignite.handlers import PiecewiseLinear
from ignite.metrics import Metric, RunningAverage
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from models.adapters import count_parameters
from engines.method_flags import method_tag, resolve_methods, resolve_user_task_methods
from engines.specs import task_spec
from models.checkpoint import (ADAPTER_WEIGHTS, FULL_WEIGHTS, load_task_tensors, load_tensors, read_config,
                               save_checkpoint)
from models.vlm import VersatileLM, backbone_fingerprint
from utils.data import (LengthGroupedBatchSampler, collate, distilled_key, load_task_data,
                        load_tokenizer, training_examples)
from utils.errors import VLMError
from utils.io import atomic_path, write_json, write_text
from utils.progress import engine_progress_bar
from utils.tasks import GPT2_VOCAB_SIZE, get_task

logger = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 3
CHECKPOINT_PREFIX = "checkpoint_epoch"
METRICS_FILE = "metrics.jsonl"
ARGS_FILE = "training_args.json"
FP16_LEVELS = ("O0", "O1", "O2", "O3")  # apex opt levels, accepted as the authors' --fp16 values
# A checkpoint folder also holds what --resume needs: tensors (optimizer moments, torch random
# states) in safetensors, everything else in JSON; nothing is pickled. The JSON file is written last.
TRAINING_TENSORS = "training_state.safetensors"
TRAINING_STATE = "training_state.json"
# The flags that decide the course of training: --resume refuses a run started with other values.
RESUME_SETTINGS = ("task", "task_file", "model_checkpoint", "dataset_path", "adapter_bottleneck", "methods", "emb_only",
                   "outputlayer_only", "random_init", "distillation", "max_history", "train_batch_size",
                   "gradient_accumulation_steps", "lr", "max_norm", "n_epochs", "seed", "fp16")


# --- settings --------------------------------------------------------------------------------
def training_mode(args, task=None):
    """full | adapter | emb_only | outputlayer_only, after checking the flags combine. "adapter"
    means per-task modules on a frozen backbone: the methods of --method (or the authors' adapter
    for --adapter_bottleneck B alone), resolved into args.methods ({method: options})."""
    if args.adapter_bottleneck is None or args.adapter_bottleneck < 0:
        raise VLMError(f"--adapter_bottleneck must be 0 (full fine-tuning) or positive, got {args.adapter_bottleneck}")
    if args.emb_only and args.outputlayer_only:
        raise VLMError("--emb_only and --outputlayer_only exclude each other; choose one")
    method = getattr(args, "method", None)
    if task is not None and task.layout == "template":
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
    """runs/<MonDD_HH-MM-SS>_<model>_<task>_<adapterB|full|...>_lr<lr>_ep<n>, like the authors' log dirs."""
    stamp = (now or datetime.now()).strftime("%b%d_%H-%M-%S")
    model = os.path.basename(os.path.normpath(args.model_checkpoint)) or "model"
    return os.path.join("runs", f"{stamp}_{model}_{args.task}_{mode_tag(args, mode)}_lr{args.lr:g}_ep{args.n_epochs}")


def check_output_dir(path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise VLMError(f"--output_dir {path}: exists and is not a folder")
    if os.path.isdir(path) and os.listdir(path):
        raise VLMError(f"--output_dir {path}: folder is not empty; choose a new one")


def user_tasks(args):
    """{name: TemplateTask} of --task_file (none without it)."""
    from utils.task_file import load_task_file
    return load_task_file(args.task_file) if getattr(args, "task_file", None) else {}


def check_dataset_path(task, path, shown=None):
    """A built-in task's dataset is a JSON file, a user task's a folder of JSON-lines splits.
    `shown`: how errors name the flag and path (default `--dataset_path PATH`)."""
    shown = shown or f"--dataset_path {path}"
    if task.layout == "template":
        if not path:
            raise VLMError(f"{shown.split()[0]}: task {task.name} is a user task; give its folder of train.jsonl, "
                           f"valid.jsonl and test.jsonl")
        if not os.path.isdir(path):
            raise VLMError(f"{shown}: dataset folder not found (task {task.name} reads train.jsonl, "
                           f"valid.jsonl and test.jsonl there)")
    elif not os.path.isfile(path):
        raise VLMError(f"{shown}: dataset file not found")


def prepare_args(args):
    """Check and complete parsed arguments in place; returns (task, mode). No file is written."""
    task = get_task(args.task, user_tasks(args))
    mode = training_mode(args, task)
    fill_task_defaults(args, task, mode)
    check_numbers(args)
    parse_fp16(args.fp16)
    if not args.device:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    resume = getattr(args, "resume", False)
    if not args.output_dir:
        if resume:
            raise VLMError("--resume needs --output_dir: the folder of the run to continue")
        args.output_dir = default_output_dir(args, mode)
    check_run_folder(args)
    check_dataset_path(task, args.dataset_path)
    return task, mode


def parse_fp16(value):
    """The authors' --fp16 took an apex opt level ('' = off). O0 is apex's pure fp32; O1-O3 -> autocast."""
    if value in ("", None, "O0"):
        return False
    if value not in FP16_LEVELS:
        raise VLMError(f"--fp16: expected '' (off) or an apex opt level {'/'.join(FP16_LEVELS)}, got {value!r}")
    return True


def resolve_device(name, fp16=False, local_rank=None):
    """torch.device for --device; with several processes on CUDA each takes cuda:<local rank>."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise VLMError(f"--device {name}: not a device name (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise VLMError(f"--device {name}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VLMError(f"--device {name}: CUDA is not available on this machine")
        if local_rank is not None:
            device = torch.device("cuda", local_rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise VLMError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if fp16 and device.type != "cuda":
        raise VLMError("--fp16 needs a CUDA device")
    return device


def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy
        numpy.random.seed(seed % 2 ** 32)


def distributed_world():
    """World size from the launcher's environment (torchrun sets WORLD_SIZE)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise VLMError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


# --- model -----------------------------------------------------------------------------------
def backbone_parameter_count(model):
    """GPT-2's own parameters: without the 30 added special-token rows or any adapter."""
    gpt2 = model.gpt2
    added = (gpt2.get_input_embeddings().weight.shape[0] - GPT2_VOCAB_SIZE) * gpt2.config.n_embd
    return count_parameters(gpt2.parameters()) - added


def trainable_line(model, mode, task_name):
    trainable = model.count_trainable(mode, task_name)
    backbone = backbone_parameter_count(model)
    share = 100.0 * trainable / backbone
    share_text = f"{share:.1f}" if share >= 0.1 or share == 0 else f"{share:.2g}"
    return f"trainable parameters: {trainable:,} ({share_text}% of the {backbone:,}-parameter backbone)"


def build_model(args, task, mode):
    """GPT-2 with the task's modules: its methods (mode adapter) or only its token rows (emb_only);
    full and outputlayer_only training add no task, so rows run as plain GPT-2 (task id -1)."""
    specs = [task_spec(task, args.methods if mode == "adapter" else {})] \
        if mode in ("adapter", "emb_only") else []
    return VersatileLM.from_pretrained(args.model_checkpoint, specs, random_init=args.random_init)


def add_virtual_positions(examples, n):
    """Examples with n virtual-token positions in front (prompt and p-tuning methods): a
    placeholder id whose embedding the method replaces, no segment, no label. A user task's
    examples have theirs where its template puts them: kept, or taken out when its method has no
    virtual tokens (n = 0)."""
    from utils.data import with_virtual_tokens
    from utils.templates import without_virtual_positions
    out = []
    for e in examples:
        if "virtual_ids" in e:
            out.append(e if n > 0 else without_virtual_positions(e))
        else:
            out.append(with_virtual_tokens(e, n) if n > 0 else e)
    return out


def template_meta(tasks):
    """{task: {"template": its task-file entry}} for the user tasks among `tasks`."""
    return {t.name: {"template": t.as_json()} for t in tasks if t.layout == "template"}


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# --- data ------------------------------------------------------------------------------------
def check_distilled(task, records, path, split):
    """--distillation reads the distilled targets; say which record lacks them (not a KeyError)."""
    key = distilled_key(task)
    for index, record in enumerate(records):
        holders = record["utterances"] if task.layout == "dialogue" else [record]
        for holder in holders:
            if key not in holder:
                raise VLMError(f"{path}: split {split!r} record {index}: --distillation needs {key!r}, "
                               f"which this record lacks")
            if task.layout == "dialogue" and not holder[key]:
                raise VLMError(f"{path}: split {split!r} record {index}: {key!r} is empty")


def load_splits(args, task, tokenizer):
    """{split: tokenized records} of the task's training and validation splits (checked, cached)."""
    train_split, valid_split = task.splits
    splits = list(dict.fromkeys([train_split, valid_split]))
    data = load_task_data(task, args.dataset_path, tokenizer, splits=splits, cache_prefix=args.dataset_cache)
    if args.distillation and task.layout == "template":
        if any(item["distilled"] is None for item in data[train_split]):
            from engines.distill import distilled_path
            fallback = distilled_path(args.dataset_path, task)
            if os.path.isdir(fallback):
                args.dataset_path = fallback
                data = load_task_data(task, fallback, tokenizer, splits=splits)
        if idist.get_rank() == 0:
            print(f"--distillation: training on the distilled answers of {args.dataset_path}")
    elif args.distillation:
        try:
            check_distilled(task, data[train_split], args.dataset_path, train_split)
        except VLMError:
            # The distiller writes a copy beside the dataset (never the dataset itself): use it.
            from engines.distill import distilled_path
            fallback = distilled_path(args.dataset_path)
            if not os.path.isfile(fallback):
                raise
            args.dataset_path = fallback
            data = load_task_data(task, args.dataset_path, tokenizer, splits=splits, cache_prefix=args.dataset_cache)
            check_distilled(task, data[train_split], args.dataset_path, train_split)
        if idist.get_rank() == 0:
            print(f"--distillation: training on the distilled targets of {args.dataset_path}")
    return data


def split_examples(args, task, data, max_positions):
    """(train examples, validation examples): train from 'train' (distilled targets with
    --distillation), validation from the task's validation split, always gold."""
    train_split, valid_split = task.splits
    train = training_examples(task, data[train_split], args.max_history, distillation=args.distillation,
                              max_positions=max_positions, where=f"{args.dataset_path} split {train_split!r}")
    valid = training_examples(task, data[valid_split], args.max_history, distillation=False,
                              max_positions=max_positions, where=f"{args.dataset_path} split {valid_split!r}")
    return train, valid


def make_loader(examples, task_id, batch_size, shuffle, seed=0, num_replicas=1, rank=0):
    sampler = LengthGroupedBatchSampler([len(e["input_ids"]) for e in examples], batch_size, shuffle=shuffle,
                                        seed=seed, num_replicas=num_replicas, rank=rank)
    return DataLoader(examples, batch_sampler=sampler, collate_fn=functools.partial(collate, task_id=task_id))


def make_loaders(train_examples, valid_examples, task_id, args, world_size=1, rank=0):
    """Training: length-grouped shuffled batches, every world_size-th batch per process.
    Validation: each process takes every world_size-th example, so the summed NLL covers all."""
    train_loader = make_loader(train_examples, task_id, args.train_batch_size, shuffle=True, seed=args.seed,
                               num_replicas=world_size, rank=rank)
    if len(train_loader) == 0:
        raise VLMError(f"{args.dataset_path}: {len(train_examples)} training examples make no batch of "
                       f"{args.train_batch_size} for each of {world_size} processes")
    if len(valid_examples) < world_size:
        raise VLMError(f"{args.dataset_path}: {len(valid_examples)} validation examples for {world_size} processes")
    valid_loader = make_loader(valid_examples[rank::world_size], task_id, args.valid_batch_size, shuffle=False)
    return train_loader, valid_loader


# --- engines ---------------------------------------------------------------------------------
def _autocast(device, enabled):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16)


def _model_inputs(batch, device, use_task_ids):
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    task_ids = batch["task_ids"] if use_task_ids else None
    batch.setdefault("virtual_ids", None)  # only batches of prompt / p-tuning tasks have them
    return batch, task_ids


class NonFiniteLoss(VLMError):
    """A NaN or infinite training loss: training stops (exit 2 through exit_on_user_error)."""


def clipped_step(optimizer, parameters, max_norm, scaler=None):
    """One optimizer step: gradients unscaled (fp16), clipped to max_norm, stepped, zeroed.
    Returns the gradient norm before clipping (also what pretrain.py logs)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def create_trainer(model, optimizer, parameters, device, gradient_accumulation_steps=1, max_norm=1.0,
                   fp16=False, use_task_ids=True):
    """Engine whose output is the batch's mean token loss (before division by the accumulation).

    A step is taken after every `gradient_accumulation_steps` iterations of an epoch and, at the
    end of an epoch, for a pending remainder (its gradient rescaled to the mean of its batches).
    Gradients are clipped once per step, just before it."""
    parameters = [p for p in parameters if p.requires_grad]
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    accumulation = {"pending": 0}

    def step():
        pending = accumulation["pending"]
        if pending == 0:
            return
        if pending < gradient_accumulation_steps:
            for p in parameters:
                if p.grad is not None:
                    p.grad.mul_(gradient_accumulation_steps / pending)
        clipped_step(optimizer, parameters, max_norm, scaler)
        accumulation["pending"] = 0

    def update(engine, batch):
        model.train()
        batch, task_ids = _model_inputs(batch, device, use_task_ids)
        with _autocast(device, fp16):
            extra = {} if batch["virtual_ids"] is None else {"virtual_ids": batch["virtual_ids"]}
            loss = model(batch["input_ids"], token_type_ids=batch["token_type_ids"], task_ids=task_ids,
                         labels=batch["labels"], **extra).loss
        value = loss.item()
        if not math.isfinite(value):  # stop before the bad gradient reaches any weight or checkpoint
            raise NonFiniteLoss(f"training loss is {value} at epoch {engine.state.epoch}, "
                                f"iteration {engine.state.iteration}")
        scaled = loss / gradient_accumulation_steps
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        accumulation["pending"] += 1
        if accumulation["pending"] == gradient_accumulation_steps:
            step()
        return value

    trainer = Engine(update)
    trainer.grad_scaler = scaler  # saved and restored with the training state
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: step())  # flush a remainder
    return trainer


def token_nll_sums(model, batch, device, use_task_ids=True, fp16=False):
    """(sum of the NLL of every label token, number of label tokens) for one batch."""
    batch, task_ids = _model_inputs(batch, device, use_task_ids)
    with torch.no_grad(), _autocast(device, fp16):
        logits, targets = unwrap(model).labelled_logits(batch["input_ids"], batch["labels"],
                                                        batch["token_type_ids"], task_ids,
                                                        virtual_ids=batch["virtual_ids"])
    nll = F.cross_entropy(logits.float(), targets, reduction="sum")
    return nll.double(), torch.tensor(targets.numel(), device=nll.device)


class TokenNLL(Metric):
    """Exact token-level mean NLL: summed over all label tokens (all processes), then divided."""

    @reinit__is_reduced
    def reset(self):
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = torch.tensor(0, dtype=torch.long, device=self._device)

    @reinit__is_reduced
    def update(self, output):
        nll_sum, count = output
        self._sum += nll_sum.detach().to(self._device)
        self._count += count.detach().to(self._device)

    @sync_all_reduce("_sum", "_count")
    def compute(self):
        if self._count.item() == 0:
            raise VLMError("validation has no label tokens")
        return (self._sum / self._count).item()


def perplexity(nll):
    try:
        return math.exp(nll)
    except OverflowError:
        return float("inf")


def create_evaluator(model, device, fp16=False, use_task_ids=True):
    """Engine over the validation loader; state.metrics: nll (token mean), ppl = exp(nll)."""
    def inference(engine, batch):
        model.eval()
        return token_nll_sums(model, batch, device, use_task_ids, fp16)

    evaluator = Engine(inference)
    TokenNLL(device=device).attach(evaluator, "nll")
    evaluator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.__setitem__(
        "ppl", perplexity(e.state.metrics["nll"])))
    return evaluator


def attach_lr_schedule(trainer, optimizer, lr, total_iterations):
    """lr from `lr` at the first iteration down to 0 at `total_iterations` (the authors' schedule)."""
    if total_iterations <= 0:
        return None
    scheduler = PiecewiseLinear(optimizer, "lr", [(0, lr), (total_iterations, 0.0)])
    trainer.add_event_handler(Events.ITERATION_STARTED, scheduler)
    return scheduler


# --- files -----------------------------------------------------------------------------------
class CheckpointKeeper:
    """Writes `<output_dir>/checkpoint_epoch<N>/` and deletes all but the newest `keep`.

    Crash safety: the folder is written as `.checkpoint_epoch<N>.partial/` (model files by `save`,
    then the training state by `save_state`, its JSON file last), flushed to disk and only then
    renamed to its final name, so a checkpoint_epoch<N>/ folder is always complete."""

    def __init__(self, output_dir, save, keep=KEEP_CHECKPOINTS, save_state=None):
        self.output_dir, self.save, self.keep, self.save_state = output_dir, save, keep, save_state

    def existing(self):
        found = []
        for name in os.listdir(self.output_dir) if os.path.isdir(self.output_dir) else []:
            match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", name)
            if match and os.path.isdir(os.path.join(self.output_dir, name)):
                found.append((int(match.group(1)), os.path.join(self.output_dir, name)))
        return [path for _, path in sorted(found)]

    def __call__(self, epoch):
        name = f"{CHECKPOINT_PREFIX}{epoch}"
        path = os.path.join(self.output_dir, name)
        partial = os.path.join(self.output_dir, f".{name}.partial")
        if os.path.isdir(partial):  # left by a killed run
            shutil.rmtree(partial)
        self.save(partial, exported=False)
        if self.save_state is not None:
            self.save_state(partial)
        sync_folder(partial)
        if os.path.isdir(path):  # a stale one (a run resumed before it): swap it out, then replace
            stale = os.path.join(self.output_dir, f".{name}.stale")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(path, stale)
            shutil.rmtree(stale)
        os.replace(partial, path)
        sync_folder(self.output_dir, files=False)
        for old in self.existing()[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old)
        return path


def sync_folder(path, files=True):
    """fsync a folder's files and the folder itself (so a rename after it cannot precede the data)."""
    if files:
        for name in os.listdir(path):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    os.fsync(f.fileno())
    with contextlib.suppress(OSError):  # folders cannot be opened for fsync on every platform
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- resumable training state ------------------------------------------------------------------
def complete_checkpoints(output_dir):
    """[(epoch, path)] of the checkpoint folders --resume can continue from, oldest first."""
    found = []
    for path in CheckpointKeeper(output_dir, None).existing():
        if os.path.isfile(os.path.join(path, TRAINING_STATE)):
            found.append((int(os.path.basename(path)[len(CHECKPOINT_PREFIX):]), path))
    return found


def latest_complete_checkpoint(output_dir):
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def random_states():
    """(JSON-ready dict, tensors) of the python, numpy, torch and CUDA random generators."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss]}
    with contextlib.suppress(ImportError):
        import numpy
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = cuda_state
    return state, tensors


def restore_random_states(state, tensors):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy
        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def optimizer_state(optimizer):
    """(JSON-ready dict, tensors) of optimizer.state_dict(): tensors keyed optimizer.<param>.<name>.

    Matrices that are mostly zero rows are stored as their nonzero rows (`.rows` indices and
    `.values`): in adapter and emb_only training the whole embedding table is a parameter but only
    the task's rows get gradients, and storing its full Adam moments would cost 2 x the table."""
    full = optimizer.state_dict()
    tensors, scalars, sparse = {}, {}, {}
    for index, values in full["state"].items():
        for name, value in values.items():
            key = f"optimizer.{index}.{name}"
            if not torch.is_tensor(value):
                scalars.setdefault(str(index), {})[name] = value
                continue
            value = value.detach().to("cpu").contiguous()
            if value.dim() >= 2:
                rows = value.reshape(value.shape[0], -1).ne(0).any(dim=1).nonzero().flatten()
                if 2 * len(rows) < value.shape[0]:
                    tensors[key + ".rows"], tensors[key + ".values"] = rows, value[rows].contiguous()
                    sparse[key] = list(value.shape)
                    continue
            tensors[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()} for group in full["param_groups"]]
    return {"param_groups": groups, "scalars": scalars, "sparse": sparse}, tensors


def restore_optimizer(optimizer, state, tensors, where):
    tensors, values = dict(tensors), {}
    for key, shape in state["sparse"].items():  # rebuilt first: their .rows/.values keys are skipped below
        rows, kept = tensors[key + ".rows"], tensors[key + ".values"]
        tensors[key] = torch.zeros(shape, dtype=kept.dtype).index_copy_(0, rows, kept)
    for key, tensor in tensors.items():
        if key.startswith("optimizer.") and key.rsplit(".", 1)[0] not in state["sparse"]:
            _, index, name = key.split(".", 2)
            values.setdefault(int(index), {})[name] = tensor
    for index, scalars in state["scalars"].items():
        values.setdefault(int(index), {}).update(scalars)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
              for group in state["param_groups"]]
    try:
        optimizer.load_state_dict({"state": values, "param_groups": groups})
    except (ValueError, KeyError) as error:
        raise VLMError(f"{where}: optimizer state does not fit this model ({error})") from None


def write_training_state(path, trainer, optimizer, scheduler, sampler, args, settings=RESUME_SETTINGS,
                         running_loss=None):
    """The training-state files of a checkpoint folder; TRAINING_STATE (the JSON) comes last."""
    optimizer_json, tensors = optimizer_state(optimizer)
    random_json, random_tensors = random_states()
    tensors.update(random_tensors)
    with atomic_path(os.path.join(path, TRAINING_TENSORS)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    scaler = getattr(trainer, "grad_scaler", None)
    state = {"engine": {"iteration": trainer.state.iteration, "epoch_length": trainer.state.epoch_length,
                        "max_epochs": trainer.state.max_epochs},
             "epoch": trainer.state.epoch, "sampler_epoch": sampler.epoch,
             "lr_scheduler": dict(scheduler.state_dict()) if scheduler is not None else None,
             "grad_scaler": dict(scaler.state_dict()) if scaler is not None else None,
             "optimizer": optimizer_json, "random": random_json,
             "running_loss": None if running_loss is None else float(running_loss),
             "settings": {name: getattr(args, name) for name in settings}}
    write_json(os.path.join(path, TRAINING_STATE), state)


def read_training_state(path):
    """(state dict, tensors) of a complete checkpoint folder."""
    state_file, tensor_file = os.path.join(path, TRAINING_STATE), os.path.join(path, TRAINING_TENSORS)
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as error:
        raise VLMError(f"{state_file}: unreadable training state ({error})") from None
    try:
        tensors = load_file(tensor_file)
    except (OSError, SafetensorError) as error:
        raise VLMError(f"{tensor_file}: corrupted or truncated safetensors file ({error})") from None
    return state, tensors


def check_resume_settings(state, args, path, settings=RESUME_SETTINGS):
    for name in settings:
        saved, now = state["settings"].get(name), getattr(args, name)
        if saved != now:
            raise VLMError(f"--resume: {path} was trained with --{name} {saved}, not {now}; "
                           f"resume with the run's own settings")


def load_trained_weights(model, path):
    """Copy a checkpoint folder's weights into the freshly built model (same mode and backbone;
    epoch checkpoints keep methods in their training form, so they load into this model as is)."""
    config = read_config(path)
    if config["mode"] == "full":
        state = load_tensors(os.path.join(path, FULL_WEIGHTS))
        missing, unexpected = model.gpt2.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the input embeddings
        if missing or unexpected:
            raise VLMError(f"{path}: weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        if any(t.methods for t in model.tasks.values()):
            load_task_tensors(model, load_tensors(os.path.join(path, ADAPTER_WEIGHTS)), path, rows=False)
    else:
        if config.get("base_fingerprint") != backbone_fingerprint(model.gpt2):
            raise VLMError(f"{path}: task modules were trained on another backbone than --model_checkpoint")
        load_task_tensors(model, load_tensors(os.path.join(path, ADAPTER_WEIGHTS)), path)


def read_metrics(path, last_iteration):
    """The records of an earlier run's metrics.jsonl up to `last_iteration` (for a resumed run)."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                raise VLMError(f"{path}: line {number} is not JSON") from None
            if record.get("iteration", 0) <= last_iteration:
                records.append(record)
    return records


class MetricsLog:
    """`metrics.jsonl`: one JSON object per validation, the whole file rewritten atomically."""

    def __init__(self, path):
        self.path, self.records = path, []

    def add(self, record):
        self.records.append(record)
        write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.records))


def attach_tensorboard(output_dir, trainer, evaluator, optimizer):
    """TensorBoard logs in <output_dir>/tensorboard when tensorboard (or tensorboardX) is installed.

    `evaluator`: one Engine (tag "validation") or {name: Engine} (tags "validation/<name>")."""
    try:
        from ignite.handlers import TensorboardLogger, global_step_from_engine
        tb_logger = TensorboardLogger(log_dir=os.path.join(output_dir, "tensorboard"))
    except ImportError:
        logger.info("tensorboard is not installed: no TensorBoard logs (metrics.jsonl has the numbers)")
        return None
    tb_logger.attach_output_handler(trainer, Events.ITERATION_COMPLETED, tag="training", metric_names=["loss"])
    tb_logger.attach_opt_params_handler(trainer, Events.ITERATION_STARTED, optimizer, param_name="lr")
    evaluators = evaluator if isinstance(evaluator, dict) else {None: evaluator}
    for name, engine in evaluators.items():
        tb_logger.attach_output_handler(engine, Events.COMPLETED,
                                        tag="validation" if name is None else f"validation/{name}",
                                        metric_names=["nll", "ppl"],
                                        global_step_transform=global_step_from_engine(trainer))
    return tb_logger


def checkpoint_saver(model, tokenizer, checkpoint_mode, tasks, base_model, fingerprint, extra, mode, task_meta=None):
    """save(path, exported=True): writes the checkpoint of `tasks` (exported=False: methods in
    their training form, for epoch checkpoints that --resume continues). `fingerprint` (the frozen
    backbone's, taken before training; None when the backbone trains) is checked again at every save."""
    def save(path, exported=True):
        # Adapter checkpoints record the backbone's fingerprint taken now, from the trained model,
        # so loading one also proves the frozen backbone did not move; a moved one stops here.
        now = backbone_fingerprint(model.gpt2) if fingerprint else None
        if now != fingerprint:
            raise RuntimeError(f"the frozen backbone changed during {mode} training (fingerprint "
                               f"{fingerprint[:12]} -> {now[:12]}); not writing {path}")
        save_checkpoint(model, tokenizer, path, checkpoint_mode, list(tasks), base_model,
                        base_fingerprint=now, extra=extra, exported=exported, task_meta=task_meta)
    return save


def json_ready(args):
    return {k: v for k, v in sorted(vars(args).items())}


def open_run_outputs(output_dir, args, trainer, evaluators, optimizer):
    """Main process only: the run folder with training_args.json, the progress bar and (when
    installed) TensorBoard. Returns (progress bar, TensorBoard logger or None)."""
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, ARGS_FILE), json_ready(args))
    pbar = engine_progress_bar()  # redraws on a terminal; in a log, a line per epoch and per 10 s
    pbar.attach(trainer, metric_names=["loss"])
    return pbar, attach_tensorboard(output_dir, trainer, evaluators, optimizer)


def run_epochs(trainer, train_loader, n_epochs, validate, pbar, tb_logger, output_dir, skip=False):
    """Train for n_epochs (with none: validate the starting model once, as the authors did with
    n_epochs < 1). A NaN or infinite loss ends as one VLMError naming the last complete checkpoint."""
    try:
        if skip:
            pass
        elif n_epochs > 0:
            trainer.run(train_loader, max_epochs=n_epochs)
        else:
            trainer.state.epoch = trainer.state.iteration = 0
            validate(trainer)
    except NonFiniteLoss as error:
        if pbar is not None and pbar.pbar is not None:  # end the bar where it stopped: the error gets its own line
            pbar.pbar.close()
        last = latest_complete_checkpoint(output_dir)
        raise VLMError(f"{error}: training stopped; last complete checkpoint: "
                       f"{last or 'none (no epoch was completed)'}") from None
    finally:
        if tb_logger is not None:
            tb_logger.close()


def configure_logging():
    """Info on the main process only; ignite's chatter, and its ERROR echo of exceptions that are
    reported anyway (one `error:` line for user errors such as a NaN loss), kept quiet."""
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    logging.getLogger("ignite").setLevel(logging.WARNING)
    logging.getLogger("ignite.engine.engine.Engine").setLevel(logging.CRITICAL)


# --- one task, end to end --------------------------------------------------------------------
@dataclass
class TrainResult:
    model: VersatileLM      # the trained model, in memory (unwrapped from DistributedDataParallel)
    tokenizer: object
    output_dir: str
    metrics: list           # the records of metrics.jsonl (rank 0; empty on other ranks)
    mode: str


def run_training(args):
    """Train one task as train.py's flags say; returns a TrainResult (the in-memory model, unwrapped).

    Launched by torchrun (WORLD_SIZE > 1) it joins the process group (gloo on CPU, nccl on CUDA),
    wraps the model in DistributedDataParallel and only rank 0 writes files or shows progress."""
    task, mode = prepare_args(args)
    fp16 = parse_fp16(args.fp16)
    return run_distributed(args.device, fp16, lambda device: _run(args, task, mode, device, fp16))


def run_distributed(device_name, fp16, body):
    """body(device) in this process or, launched by torchrun (WORLD_SIZE > 1), inside the process
    group (gloo on CPU, nccl on CUDA; each process on cuda:<local rank>); returns body's result."""
    if distributed_world() <= 1:
        return body(resolve_device(device_name, fp16))
    device = resolve_device(device_name, fp16, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if idist.get_world_size() > 1:  # the caller already joined the process group
        return body(device)
    idist.initialize("nccl" if device.type == "cuda" else "gloo")
    try:
        result = body(device)
        idist.barrier()  # rank 0 has written its files before anyone leaves
        return result
    finally:
        idist.finalize()


@dataclass
class RunPlan:
    """What one training run trains and on which data, built by train.py's or train_vlm.py's side;
    `train_run` does the rest the same way for both (engines, schedule, validation, checkpoints,
    --resume, progress and the final save)."""
    model: VersatileLM
    tokenizer: object
    mode: str               # the mark_trainable mode: full | adapter | emb_only | outputlayer_only
    tasks: object           # a task name (train.py) or a list of names (train_vlm.py)
    checkpoint_mode: str    # what the saved checkpoint is: "adapter" (task modules only) or "full"
    fingerprint: object     # the frozen backbone's fingerprint, None when the backbone trains
    train_loader: DataLoader
    valid_loaders: dict     # {task: validation loader}
    use_task_ids: bool      # rows run their task's modules (False: plain GPT-2, task id -1)
    extra: dict             # extra checkpoint config entries
    per_task_metrics: bool  # metrics.jsonl records "val": {task: ...} (train_vlm.py) or val_nll/val_ppl
    find_unused_parameters: bool = False  # DDP: a batch may leave some tasks' modules without gradient
    describe: object = None  # main process, after the trainable line: logs the data and the setting
    task_meta: dict = None   # {task: extra config entries}: a user task's template, so its checkpoint describes it


def format_validation(epoch, per_task, mean):
    parts = [f"{task} nll {m['nll']:.4f} ppl {m['ppl']:.3f}" for task, m in per_task.items()]
    return f"validation after epoch {epoch}: " + ", ".join(parts) + f"; mean nll {mean:.4f}"


def check_run_folder(args):
    """--output_dir for a new run must be new or empty; for --resume it must hold a complete checkpoint."""
    if getattr(args, "resume", False):
        if latest_complete_checkpoint(args.output_dir) is None:
            raise VLMError(f"--resume: no complete {CHECKPOINT_PREFIX}<N>/ checkpoint (with {TRAINING_STATE}) "
                           f"in --output_dir {args.output_dir}")
    else:
        check_output_dir(args.output_dir)


def _run(args, task, mode, device, fp16):
    return train_run(args, device, fp16, RESUME_SETTINGS,
                     lambda world_size, rank: single_task_plan(args, task, mode, world_size, rank))


def single_task_plan(args, task, mode, world_size, rank):
    """train.py's RunPlan: one task's data and model (its methods, its rows, or all of GPT-2)."""
    tokenizer = load_tokenizer(args.model_checkpoint)
    data = load_splits(args, task, tokenizer)  # bad data files stop here, before the model loads
    model = build_model(args, task, mode)
    fingerprint = backbone_fingerprint(model.gpt2) if mode in ("adapter", "emb_only") else None
    n_virtual = model.tasks[task.name].num_virtual_tokens if task.name in model.tasks else 0
    train_examples, valid_examples = split_examples(args, task, data, model.config.n_positions - n_virtual)
    train_examples = add_virtual_positions(train_examples, n_virtual)
    valid_examples = add_virtual_positions(valid_examples, n_virtual)
    train_loader, valid_loader = make_loaders(train_examples, valid_examples, task.task_id, args, world_size, rank)

    def describe(device):
        logger.info("%s: %d training examples, %d batches per epoch and process, %d validation examples; mode %s on %s%s",
                    task.name, len(train_examples), len(train_loader), len(valid_examples), mode, device,
                    f" x {world_size} processes" if world_size > 1 else "")
    return RunPlan(model, tokenizer, mode, task.name, "adapter" if mode in ("adapter", "emb_only") else "full",
                   fingerprint, train_loader, {task.name: valid_loader}, task.name in model.tasks,
                   {"training_args": json_ready(args)}, per_task_metrics=False, describe=describe,
                   task_meta=template_meta([task]))


def train_run(args, device, fp16, settings, build_plan):
    """The run loop of train.py and train_vlm.py: build_plan(world_size, rank) -> RunPlan, then
    train it for args.n_epochs with args.lr, args.gradient_accumulation_steps, args.max_norm,
    validating and checkpointing every epoch into args.output_dir; with args.resume, continue
    from its last complete checkpoint (`settings`: the flags that must not change). Returns a TrainResult."""
    world_size, rank = idist.get_world_size(), idist.get_rank()
    main_process = rank == 0
    set_seed(args.seed)

    resume_path = latest_complete_checkpoint(args.output_dir) if getattr(args, "resume", False) else None
    if resume_path is not None:  # a damaged or mismatched state stops here, before data and model load
        resume_state, resume_tensors = read_training_state(resume_path)
        check_resume_settings(resume_state, args, resume_path, settings)
    plan = build_plan(world_size, rank)
    model, train_loader = plan.model, plan.train_loader
    if resume_path is not None:
        load_trained_weights(model, resume_path)

    model.to(device)
    parameters = model.mark_trainable(plan.mode, plan.tasks)
    if main_process:
        print(trainable_line(model, plan.mode, plan.tasks))
        if plan.describe is not None:
            plan.describe(device)
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    train_model = model
    if world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=plan.find_unused_parameters)

    trainer = create_trainer(train_model, optimizer, parameters, device, args.gradient_accumulation_steps,
                             args.max_norm, fp16, plan.use_task_ids)
    evaluators = {name: create_evaluator(model, device, fp16, plan.use_task_ids) for name in plan.valid_loaders}
    scheduler = attach_lr_schedule(trainer, optimizer, args.lr, args.n_epochs * len(train_loader))
    running_loss = RunningAverage(output_transform=lambda loss: loss)
    running_loss.attach(trainer, "loss")
    # The batch order of an epoch depends only on (seed, epoch): a resumed epoch replays it exactly.
    sampler = train_loader.batch_sampler
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: sampler.set_epoch(e.state.epoch))

    output_dir = args.output_dir
    metrics_log = MetricsLog(os.path.join(output_dir, METRICS_FILE))
    if resume_path is not None:
        restore_optimizer(optimizer, resume_state["optimizer"], resume_tensors, resume_path)
        if scheduler is not None and resume_state["lr_scheduler"] is not None:
            scheduler.load_state_dict(resume_state["lr_scheduler"])
        if trainer.grad_scaler is not None and resume_state["grad_scaler"] is not None:
            trainer.grad_scaler.load_state_dict(resume_state["grad_scaler"])
        trainer.load_state_dict(resume_state["engine"])
        sampler.set_epoch(resume_state["sampler_epoch"])
        metrics_log.records = read_metrics(os.path.join(output_dir, METRICS_FILE),
                                           resume_state["engine"]["iteration"])
        if resume_state.get("running_loss") is not None:
            # After the metric's own reset at STARTED (registered before this), so the logged
            # training loss continues as in the uninterrupted run.
            trainer.add_event_handler(Events.STARTED, lambda _: setattr(running_loss, "_value",
                                                                        resume_state["running_loss"]))

    save = checkpoint_saver(model, plan.tokenizer, plan.checkpoint_mode,
                            [plan.tasks] if isinstance(plan.tasks, str) else plan.tasks,
                            args.model_checkpoint, plan.fingerprint, plan.extra, plan.mode, plan.task_meta)
    keeper = CheckpointKeeper(output_dir, save, save_state=lambda path: write_training_state(
        path, trainer, optimizer, scheduler, sampler, args, settings, running_loss._value))
    pbar = None
    tb_logger = None
    start = time.time()

    def validate(engine):
        # Every process runs every evaluator in the same order: the metrics all-reduce.
        per_task = {}
        for name, loader in plan.valid_loaders.items():
            metrics = evaluators[name].run(loader).metrics
            per_task[name] = {"nll": metrics["nll"], "ppl": metrics["ppl"]}
        if not main_process:
            return
        loss = engine.state.metrics.get("loss")
        record = {"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                  "train_loss": None if loss is None else float(loss)}
        if plan.per_task_metrics:
            mean = sum(m["nll"] for m in per_task.values()) / len(per_task)
            record["val"] = {name: {"nll": m["nll"], "ppl": m["ppl"] if math.isfinite(m["ppl"]) else None}
                             for name, m in per_task.items()}
            record["val_nll_mean"] = mean
            message = format_validation(engine.state.epoch, per_task, mean)
        else:
            (nll, ppl), = ((m["nll"], m["ppl"]) for m in per_task.values())
            record.update(val_nll=nll, val_ppl=ppl if math.isfinite(ppl) else None)
            message = f"validation after epoch {engine.state.epoch}: nll {nll:.4f}, ppl {ppl:.3f}"
        record.update(lr=optimizer.param_groups[0]["lr"], elapsed=round(time.time() - start, 3))
        metrics_log.add(record)
        (pbar.log_message if pbar is not None else logger.info)(message)

    if main_process:
        pbar, tb_logger = open_run_outputs(output_dir, args, trainer,
                                           evaluators if plan.per_task_metrics else next(iter(evaluators.values())),
                                           optimizer)
    if args.eval_before_start and resume_path is None:  # a resumed run has that record already
        trainer.add_event_handler(Events.STARTED, validate)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, validate)
    if main_process:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: keeper(e.state.epoch))

    if resume_path is not None:
        if main_process:
            logger.info("resuming from %s (epoch %d, iteration %d)", resume_path, resume_state["epoch"],
                        resume_state["engine"]["iteration"])
        # Last, after everything that draws random numbers while setting up: the generators then
        # continue exactly where the checkpointed run left them (dropout masks included).
        restore_random_states(resume_state["random"], resume_tensors)
    finished = resume_path is not None and resume_state["epoch"] >= args.n_epochs  # only the final model is missing
    run_epochs(trainer, train_loader, args.n_epochs, validate, pbar, tb_logger, output_dir, skip=finished)
    if main_process:
        save(output_dir)
        print(f"model saved to {output_dir}")
    return TrainResult(model, plan.tokenizer, output_dir, metrics_log.records, plan.mode)
