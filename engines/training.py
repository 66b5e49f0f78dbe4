"""The run loop of train.py and train_vlm.py: build a RunPlan (what trains, on which data), then
train it epoch by epoch, validating and checkpointing, continuing from a checkpoint with --resume,
and save the final model. `train_run` reads top to bottom as the recipe; its pieces live beside it:

    settings.py   flags checked and completed         loaders.py    data and batches
    runtime.py    devices, seeds, torchrun             steps.py      trainer and evaluator engines
    run_state.py  checkpoints, resume state, metrics.jsonl
"""
import logging
import math
import os
import time
from dataclasses import dataclass, field

import ignite.distributed as idist
import torch
from ignite.engine import Events
from ignite.metrics import RunningAverage
from torch.utils.data import DataLoader

from engines.loaders import add_virtual_positions, load_splits, make_loaders, split_examples
from engines.poly import POLY_SETTINGS, poly_plan, prepare_with_poly
from engines.pruning import check_resumed_masks, prune_tasks, sparsity_lines
from engines.run_state import (
    METRICS_FILE,
    CheckpointKeeper,
    MetricsLog,
    check_resume_settings,
    latest_complete_checkpoint,
    read_metrics,
    read_training_state,
    restore_optimizer,
    restore_random_states,
    write_training_state,
)
from engines.runtime import run_distributed, set_seed
from engines.settings import RESUME_SETTINGS, parse_fp16, prepare_args
from engines.specs import task_spec
from engines.steps import NonFiniteLoss, attach_lr_schedule, create_evaluator, create_trainer
from models.adapters import count_parameters
from models.checkpoint import load_weights, save_checkpoint
from models.sparsity import keep_pruned_at_zero
from models.vlm import VersatileLM, backbone_fingerprint
from utils.data import load_tokenizer
from utils.errors import VLMError
from utils.io import write_json
from utils.progress import engine_progress_bar
from utils.vocab import GPT2_VOCAB_SIZE

logger = logging.getLogger(__name__)

ARGS_FILE = "training_args.json"


def backbone_parameter_count(model):
    """GPT-2's own parameters: without the 30 added special-token rows or any adapter."""
    gpt2 = model.gpt2
    added = (gpt2.get_input_embeddings().weight.shape[0] - GPT2_VOCAB_SIZE) * gpt2.config.n_embd
    return count_parameters(gpt2.parameters()) - added


def trainable_line(model, mode, task_name, shared=0):
    trainable = model.count_trainable(mode, task_name) + shared  # shared: a cross-task method's tensors
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


def checkpoint_task_meta(tasks):
    """{task: extra config entries} a checkpoint records of its tasks (a user task's template)."""
    return {task.name: task.checkpoint_meta() for task in tasks if task.checkpoint_meta()}


def json_ready(args):
    return {k: v for k, v in sorted(vars(args).items())}


def attach_tensorboard(output_dir, trainer, evaluator, optimizer):
    """TensorBoard logs in <output_dir>/tensorboard when tensorboard (or tensorboardX) is installed.

    `evaluator`: one Engine (tag "validation") or {name: Engine} (tags "validation/<name>")."""
    try:
        from ignite.handlers import TensorboardLogger, global_step_from_engine
        tb_logger = TensorboardLogger(log_dir=os.path.join(output_dir, "tensorboard"))
    except ImportError:
        logger.info("tensorboard is not installed: no TensorBoard logs (metrics.jsonl has the numbers)")
        return None
    tb_logger.attach_output_handler(trainer, Events.ITERATION_COMPLETED, tag="training",
                                    metric_names=["loss"])
    tb_logger.attach_opt_params_handler(trainer, Events.ITERATION_STARTED, optimizer, param_name="lr")
    evaluators = evaluator if isinstance(evaluator, dict) else {None: evaluator}
    for name, engine in evaluators.items():
        tb_logger.attach_output_handler(engine, Events.COMPLETED,
                                        tag="validation" if name is None else f"validation/{name}",
                                        metric_names=["nll", "ppl"],
                                        global_step_transform=global_step_from_engine(trainer))
    return tb_logger


def checkpoint_saver(model, tokenizer, checkpoint_mode, tasks, base_model, fingerprint, extra, mode,
                     task_meta=None, cross_task=None):
    """save(path, exported=True): writes the checkpoint of `tasks` (exported=False: methods in
    their training form, for epoch checkpoints that --resume continues). `fingerprint` (the frozen
    backbone's, taken before training; None when the backbone trains) is checked again at every save.
    cross_task (RunPlan.cross_task) adds its own files to every folder."""
    def save(path, exported=True):
        # Adapter checkpoints record the backbone's fingerprint taken now, from the trained model,
        # so loading one also proves the frozen backbone did not move; a moved one stops here.
        now = backbone_fingerprint(model.gpt2) if fingerprint else None
        if now != fingerprint:
            raise RuntimeError(f"the frozen backbone changed during {mode} training (fingerprint "
                               f"{fingerprint[:12]} -> {now[:12]}); not writing {path}")
        save_checkpoint(model, tokenizer, path, checkpoint_mode, list(tasks), base_model,
                        base_fingerprint=now, extra=extra, exported=exported, task_meta=task_meta)
        if cross_task is not None:
            cross_task.save(path)
    return save


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
        # end the bar where it stopped: the error gets its own line
        if pbar is not None and pbar.pbar is not None:
            pbar.pbar.close()
        last = latest_complete_checkpoint(output_dir)
        raise VLMError(f"{error}: training stopped; last complete checkpoint: "
                       f"{last or 'none (no epoch was completed)'}") from None
    finally:
        if tb_logger is not None:
            tb_logger.close()


@dataclass
class TrainResult:
    model: VersatileLM      # the trained model, in memory (unwrapped from DistributedDataParallel)
    tokenizer: object
    output_dir: str
    metrics: list           # the records of metrics.jsonl (rank 0; empty on other ranks)
    mode: str
    # The loss of every iteration this process ran, in order: its batch's mean token loss (before
    # the division by the accumulation steps); a resumed run's start where it went on.
    step_losses: list = field(default_factory=list)


def run_training(args):
    """Train one task as train.py's flags say; returns a TrainResult (the in-memory model, unwrapped).

    Launched by torchrun (WORLD_SIZE > 1) it joins the process group (gloo on CPU, nccl on CUDA),
    wraps the model in DistributedDataParallel and only rank 0 writes files or shows progress."""
    task, mode = prepare_with_poly(args, prepare_args)
    fp16 = parse_fp16(args.fp16)
    return run_distributed(args.device, fp16, lambda device: _run(args, task, mode, device, fp16))


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
    task_meta: dict = None   # {task: extra config entries}: a user task's template, so its
                             # checkpoint describes it
    cross_task: object = None  # a cross-task method's run (engines/poly.py's PolyRun): optimizer_groups(),
                               # trainable_count(), and save(path) / load(path) of its shared tensors


def format_validation(epoch, per_task, mean):
    parts = [f"{task} nll {m['nll']:.4f} ppl {m['ppl']:.3f}" for task, m in per_task.items()]
    return f"validation after epoch {epoch}: " + ", ".join(parts) + f"; mean nll {mean:.4f}"


def _run(args, task, mode, device, fp16):
    return train_run(args, device, fp16, RESUME_SETTINGS + POLY_SETTINGS,
                     lambda world_size, rank: single_task_plan(args, task, mode, world_size, rank))


def single_task_plan(args, task, mode, world_size, rank):
    """train.py's RunPlan: one task's data and model (its methods, its rows, or all of GPT-2)."""
    tokenizer = load_tokenizer(args.model_checkpoint)
    data = load_splits(args, task, tokenizer)  # bad data files stop here, before the model loads
    model = build_model(args, task, mode)
    fingerprint = backbone_fingerprint(model.gpt2) if mode in ("adapter", "emb_only") else None
    cross_task = poly_plan(model, args, fingerprint)
    n_virtual = sum(t.num_virtual_tokens for t in model.tasks.values())  # the one task's, or none
    train_examples, valid_examples = split_examples(args, task, data, model.config.n_positions - n_virtual)
    train_examples = add_virtual_positions(train_examples, n_virtual)
    valid_examples = add_virtual_positions(valid_examples, n_virtual)
    train_loader, valid_loader = make_loaders(train_examples, valid_examples, task.task_id, args, world_size,
                                              rank)

    def describe(device):
        logger.info("%s: %d training examples, %d batches per epoch and process, %d validation examples; "
                    "mode %s on %s%s",
                    task.name, len(train_examples), len(train_loader), len(valid_examples), mode, device,
                    f" x {world_size} processes" if world_size > 1 else "")
    return RunPlan(model, tokenizer, mode, task.name,
                   "adapter" if mode in ("adapter", "emb_only") else "full", fingerprint, train_loader,
                   {task.name: valid_loader}, bool(model.tasks), {"training_args": json_ready(args)},
                   per_task_metrics=False, describe=describe, task_meta=checkpoint_task_meta([task]),
                   cross_task=cross_task)


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
    shared = plan.cross_task
    if resume_path is not None:
        load_weights(model, resume_path)
        if shared is not None:
            shared.load(resume_path)

    model.to(device)
    parameters = model.mark_trainable(plan.mode, plan.tasks)
    groups = shared.optimizer_groups(parameters, args.lr) if shared is not None else None
    parameters = [p for group in groups for p in group["params"]] if groups else parameters
    sparse = getattr(args, "sparsity", None) is not None
    if sparse and resume_path is None:  # masks fixed before the first step (SNIP: on training batches)
        pruning = prune_tasks(model, plan.tasks, args, train_loader, device, plan.use_task_ids)
    elif sparse:                         # a resumed run keeps its checkpoint's masks
        check_resumed_masks(model, plan.tasks)
        pruning = sparsity_lines(model, plan.tasks)
    if main_process:
        print(trainable_line(model, plan.mode, plan.tasks, shared.trainable_count() if shared else 0))
        for line in pruning if sparse else ():
            print(line)
        if plan.describe is not None:
            plan.describe(device)
    optimizer = torch.optim.AdamW(groups or parameters, lr=args.lr, weight_decay=0.0)
    if sparse:
        keep_pruned_at_zero(optimizer, model)
    train_model = model
    if world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=plan.find_unused_parameters)

    trainer = create_trainer(train_model, optimizer, parameters, device, args.gradient_accumulation_steps,
                             args.max_norm, fp16, plan.use_task_ids)
    evaluators = {name: create_evaluator(model, device, fp16, plan.use_task_ids)
                  for name in plan.valid_loaders}
    scheduler = attach_lr_schedule(trainer, optimizer, args.lr, args.n_epochs * len(train_loader))
    running_loss = RunningAverage(output_transform=lambda loss: loss)
    running_loss.attach(trainer, "loss")
    step_losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: step_losses.append(e.state.output))
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
                            args.model_checkpoint, plan.fingerprint, plan.extra, plan.mode, plan.task_meta,
                            shared)
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
                                           evaluators if plan.per_task_metrics
                                           else next(iter(evaluators.values())),
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
    # only the final model is missing
    finished = resume_path is not None and resume_state["epoch"] >= args.n_epochs
    run_epochs(trainer, train_loader, args.n_epochs, validate, pbar, tb_logger, output_dir, skip=finished)
    if main_process:
        save(output_dir)
        print(f"model saved to {output_dir}")
    return TrainResult(model, plan.tokenizer, output_dir, metrics_log.records, plan.mode, step_losses)
