"""Multi-task training of the Versatile Language Model on several tasks' data at once (what
train_vlm.py calls), with engines/training.py's run loop.

Default mode "adapter": each task's adapters (bottleneck from the task table) and its own
special-token rows train on a frozen GPT-2; the result is one multi-task adapter checkpoint.
Mode "full" (--no_adapter, as in the authors' train_vlm.py): all of GPT-2 trains on the mixed
data with no adapters, and the result is a full checkpoint (decoded with task id -1). Task
sampling: engines/sampling.py."""
import logging

from engines.loaders import load_all_tasks, make_multitask_loaders, task_examples
from engines.method_flags import method_tag
from engines.poly import POLY_SETTINGS, poly_plan, prepare_with_poly
from engines.runtime import run_distributed
from engines.settings import MULTITASK_RESUME_SETTINGS, parse_fp16, prepare_multitask_args, user_tasks
from engines.specs import task_spec
from engines.training import RunPlan, checkpoint_task_meta, json_ready, train_run
from models.vlm import VersatileLM, backbone_fingerprint
from tasks.table import get_task
from utils.data import load_tokenizer

logger = logging.getLogger(__name__)


def run_multitask(args):
    """Train on all of args.tasks at once as train_vlm.py's flags say; returns a
    engines.training.TrainResult (the in-memory model, unwrapped; metrics on rank 0 only)."""
    mode = prepare_with_poly(args, prepare_multitask_args)
    fp16 = parse_fp16(args.fp16)
    return run_distributed(args.device, fp16, lambda device: train_run(
        args, device, fp16, MULTITASK_RESUME_SETTINGS + POLY_SETTINGS,
        lambda world_size, rank: multitask_plan(args, mode, world_size, rank)))


def multitask_plan(args, mode, world_size, rank):
    """train_vlm.py's RunPlan: every task's data in one sampler; each task's methods and rows on a
    frozen backbone (mode adapter) or all of GPT-2 (full, rows decoded as plain GPT-2)."""
    tokenizer = load_tokenizer(args.model_checkpoint)
    users = user_tasks(args)
    data = load_all_tasks(args, tokenizer, users)  # bad data files stop here, before the model loads
    specs = ([task_spec(get_task(name, users), args.methods[name]) for name in args.tasks]
             if mode == "adapter" else [])
    model = VersatileLM.from_pretrained(args.model_checkpoint, specs)
    fingerprint = backbone_fingerprint(model.gpt2) if mode == "adapter" else None
    cross_task = poly_plan(model, args, fingerprint)  # poly tasks: their modules over a shared inventory
    virtual = {name: model.tasks[name].num_virtual_tokens for name in args.tasks if name in model.tasks}
    examples = task_examples(args, data, model.config.n_positions, users, virtual)
    train_loader, valid_loaders = make_multitask_loaders(examples, args, world_size, rank)
    sampler = train_loader.batch_sampler

    def describe(device):
        for name in args.tasks:
            logger.info("%s: %d training examples, %d drawn per epoch; %d validation examples%s", name,
                        sampler.sizes[name], sampler.counts[name], len(examples[name][1]),
                        f"; {method_tag(args.methods[name])}" if mode == "adapter" else "")
        logger.info("%d batches per epoch and process (%s, temperature %g); mode %s on %s%s",
                    len(train_loader),
                    "tasks mixed in batches" if args.mix_tasks else "one task per batch",
                    args.temperature, mode, device, f" x {world_size} processes" if world_size > 1 else "")
        for name in (n for n, count in sampler.counts.items() if count == 0):
            logger.warning("%s: temperature %g draws none of its examples per epoch", name, args.temperature)

    extra = {"training_args": json_ready(args),
             "multitask": {"tasks": list(args.tasks), "temperature": args.temperature,
                           "mix_tasks": args.mix_tasks, "examples_per_epoch": dict(sampler.counts)}}
    # A batch need not hold every task, so under DDP some tasks' modules get no gradient in a step.
    return RunPlan(model, tokenizer, mode, list(args.tasks), mode, fingerprint, train_loader, valid_loaders,
                   use_task_ids=mode == "adapter", extra=extra, per_task_metrics=True,
                   find_unused_parameters=mode == "adapter", describe=describe,
                   task_meta=checkpoint_task_meta([get_task(name, users) for name in args.tasks]),
                   cross_task=cross_task)
