"""--sparsity S --prune snip|magnitude|random for train.py and train_vlm.py (SparseAdapter, He et al.
2022): before the first step, every trained task's method weight tensors are pruned to sparsity S
(models/sparsity.py decides which tensors, keeps the masks through training and packs checkpoints);
SNIP's scores need the loss's gradient on training batches, computed here. A resumed run takes the
masks its checkpoint stores and prunes nothing again."""
import zlib

import ignite.distributed as idist
import torch

from engines.steps import _model_inputs
from models.sparsity import (
    PRUNE_KINDS,
    check_sparsity,
    masks_of,
    prunable,
    prune_method,
    summary_line,
    task_summary,
)
from utils.errors import VLMError


def add_pruning_arguments(parser):
    group = parser.add_argument_group("pruning (SparseAdapter, He et al. 2022)")
    group.add_argument("--sparsity", type=float, default=None, metavar="S",
                       help="prune each task's method weights to sparsity S before training, the share "
                            "removed (0.8: 80%% zeros), kept through training; checkpoints store only "
                            "the kept values and a bit mask. Pruned: the weight matrices (tensors with two "
                            "sides longer than 1) of adapter, houlsby, parallel, lora, compacter, krona, "
                            "unipelt (its LoRA and adapter), ...; never biases, LayerNorms, (1, d) gates, "
                            "vectors (ln, adapterbias), virtual tokens or prefixes (prompt, ptuning, "
                            "prefix). "
                            "Large-Sparse, a wider bottleneck storing as many values as the dense one: "
                            "python -m models.sparsity --method adapter --bottleneck B --sparsity S prints "
                            "the bottleneck to give. None: no pruning")
    group.add_argument("--prune", choices=PRUNE_KINDS, default=None,
                       help="how the kept weights are chosen: snip |w * dL/dw| on training batches at "
                            "initialisation, magnitude |w|, random (default with --sparsity: snip)")
    group.add_argument("--snip_batches", type=int, default=None,
                       help="training batches SNIP's gradient sums, per task (default with --prune snip: 1)")
    return parser


def check_pruning_args(args, mode):
    """Complete and check --sparsity/--prune/--snip_batches in place (all None when not pruning)."""
    sparsity, prune, batches = (getattr(args, name, None) for name in ("sparsity", "prune", "snip_batches"))
    if sparsity is None:
        for flag, value in (("--prune", prune), ("--snip_batches", batches)):
            if value is not None:
                raise VLMError(f"{flag} {value} chooses what --sparsity prunes; give --sparsity S too")
        return
    check_sparsity(sparsity)
    if mode != "adapter":
        trains = {"full": "all of GPT-2", "emb_only": "only the task embeddings",
                  "outputlayer_only": "only the output layer"}[mode]
        raise VLMError(f"--sparsity {sparsity:g} prunes per-task method weights on a frozen backbone; "
                       f"this run trains {trains}")
    args.prune = prune or "snip"
    if args.prune != "snip" and batches is not None:
        raise VLMError(f"--snip_batches {batches} is for --prune snip, not --prune {args.prune}")
    if args.prune == "snip":
        args.snip_batches = 1 if batches is None else batches
        if args.snip_batches < 1:
            raise VLMError(f"--snip_batches must be at least 1, got {args.snip_batches}")


def task_names(tasks):
    return [tasks] if isinstance(tasks, str) else list(tasks)


def prunable_tasks(model, tasks):
    names = [t for t in task_names(tasks) if any(prunable(m) for m in model.tasks[t].methods.values())]
    if not names:
        methods = list(dict.fromkeys(m for t in task_names(tasks) for m in model.tasks[t].methods))
        raise VLMError(f"--sparsity: --method {'+'.join(methods)}: no weight matrices to prune (only "
                       f"vectors, embeddings, virtual tokens or prefixes)")
    return names


def snip_gradients(model, names, loader, device, use_task_ids, batches):
    """Sum the training loss's gradients over the first training batches until every task in `names`
    has rows in `batches` of them (or the epoch ends); in eval mode, so no dropout draws. Returns
    {task: batches it had rows in}. Under DDP the gradients are summed over the processes, so every
    process fixes the same masks."""
    seen = {name: 0 for name in names}
    by_id = {model.tasks[name].task_id: name for name in names}
    was_training = model.training
    model.eval()
    for batch in loader:
        batch, task_ids = _model_inputs(batch, device, use_task_ids)
        present = {by_id[i] for i in set(batch["task_ids"].tolist()) if i in by_id}
        if not present & {n for n, count in seen.items() if count < batches}:
            continue
        extra = {} if batch["virtual_ids"] is None else {"virtual_ids": batch["virtual_ids"]}
        model(batch["input_ids"], token_type_ids=batch["token_type_ids"], task_ids=task_ids,
              labels=batch["labels"], **extra).loss.backward()
        for name in present:
            seen[name] += 1
        if min(seen.values()) >= batches:
            break
    model.train(was_training)
    if idist.get_world_size() > 1:
        for name in names:
            for method in model.tasks[name].methods.values():
                for param in prunable(method).values():
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
                    idist.all_reduce(param.grad)
    return seen


def prune_tasks(model, tasks, args, loader, device, use_task_ids):
    """Fix every trained task's masks (--sparsity, --prune) before the first step; returns the log lines."""
    names = prunable_tasks(model, tasks)
    seen = None
    if args.prune == "snip":
        model.zero_grad(set_to_none=True)
        seen = snip_gradients(model, names, loader, device, use_task_ids, args.snip_batches)
    for name in names:
        # Each task's ties and random scores from its own seed: a task's masks do not depend on the others.
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + zlib.crc32(name.encode()))
        for method in model.tasks[name].methods.values():
            prune_method(method, args.sparsity, args.prune, generator)
    model.zero_grad(set_to_none=True)
    lines = [f"pruning: --sparsity {args.sparsity:g} --prune {args.prune}"
             + (f" ({args.snip_batches} training batch{'es' if args.snip_batches > 1 else ''} per task)"
                if seen is not None else "")]
    for name in names:
        if seen is not None and seen[name] == 0:
            lines.append(f"{name}: no SNIP batch held its rows; its masks are random")
    return lines + sparsity_lines(model, tasks)


def sparsity_lines(model, tasks):
    """One line per pruned task: stored values and bytes (also in the checkpoint config's "sparsity")."""
    return [summary_line(name, task_summary(model.tasks[name])) for name in task_names(tasks)
            if name in model.tasks and any(masks_of(m) for m in model.tasks[name].methods.values())]


def check_resumed_masks(model, tasks):
    """A resumed --sparsity run continues with its checkpoint's masks; one without any is an error."""
    if not sparsity_lines(model, tasks):
        raise VLMError("--resume --sparsity: the checkpoint holds no pruned tensors")
