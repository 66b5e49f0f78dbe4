"""Training data of a run: a task's checked splits (the distilled copy with --distillation), its
examples with virtual-token positions, and the loaders of train.py (one task) and train_vlm.py
(every task's examples in one length-grouped, temperature-sampled stream)."""
import functools
import os

import ignite.distributed as idist
from torch.utils.data import DataLoader

from engines.sampling import MultiTaskBatchSampler
from tasks.table import get_task
from tasks.template import without_virtual_positions
from utils.data import LengthGroupedBatchSampler, collate, with_virtual_tokens
from utils.errors import VLMError


def load_splits(args, task, tokenizer):
    """{split: tokenized records} of the task's training and validation splits (checked, cached).
    With --distillation, when the dataset lacks the distilled targets, the distiller's copy beside
    it (never the dataset itself) is read instead, and args.dataset_path names it."""
    train_split, valid_split = task.splits
    splits = list(dict.fromkeys([train_split, valid_split]))
    data = task.load_data(args.dataset_path, tokenizer, splits, args.dataset_cache)
    if args.distillation:
        try:
            task.check_distilled(data[train_split], args.dataset_path, train_split)
        except VLMError:
            fallback = task.distilled_path(args.dataset_path)
            if not os.path.exists(fallback):
                raise
            args.dataset_path = fallback
            data = task.load_data(fallback, tokenizer, splits, args.dataset_cache)
            task.check_distilled(data[train_split], args.dataset_path, train_split)
        if idist.get_rank() == 0:
            print(f"--distillation: training on the distilled targets of {args.dataset_path}")
    return data


def split_examples(args, task, data, max_positions):
    """(train examples, validation examples): train from 'train' (distilled targets with
    --distillation), validation from the task's validation split, always gold."""
    train_split, valid_split = task.splits
    train = task.training_examples(data[train_split], args.max_history, distillation=args.distillation,
                                   max_positions=max_positions,
                                   where=f"{args.dataset_path} split {train_split!r}")
    valid = task.training_examples(data[valid_split], args.max_history, distillation=False,
                                   max_positions=max_positions,
                                   where=f"{args.dataset_path} split {valid_split!r}")
    return train, valid


def add_virtual_positions(examples, n):
    """Examples with n virtual-token positions in front (prompt and p-tuning methods): a
    placeholder id whose embedding the method replaces, no segment, no label. A user task's
    examples have theirs where its template puts them: kept, or taken out when its method has no
    virtual tokens (n = 0)."""
    out = []
    for e in examples:
        if "virtual_ids" in e:
            out.append(e if n > 0 else without_virtual_positions(e))
        else:
            out.append(with_virtual_tokens(e, n) if n > 0 else e)
    return out


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
        raise VLMError(f"{args.dataset_path}: {len(valid_examples)} validation examples "
                       f"for {world_size} processes")
    valid_loader = make_loader(valid_examples[rank::world_size], task_id, args.valid_batch_size,
                               shuffle=False)
    return train_loader, valid_loader


def load_all_tasks(args, tokenizer, users):
    """{task: tokenized training and validation splits}; every file is checked before any model loads."""
    data = {}
    for name in args.tasks:
        task = get_task(name, users)
        data[name] = task.load_data(args.dataset_paths[name], tokenizer, list(dict.fromkeys(task.splits)),
                                    args.dataset_cache)
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
            split_examples = task.training_examples(data[name][split], max_history,
                                                    max_positions=max_positions - n_virtual,
                                                    where=f"{path} split {split!r}")
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
    sampler = MultiTaskBatchSampler({name: [len(e["input_ids"]) for e in examples[name][0]]
                                     for name in args.tasks},
                                    args.train_batch_size, args.temperature, args.mix_tasks, seed=args.seed,
                                    num_replicas=world_size, rank=rank)
    # task_id=None: never used, every example carries its own.
    train_loader = DataLoader(train, batch_sampler=sampler,
                              collate_fn=functools.partial(collate, task_id=None))
    if len(train_loader) == 0:
        raise VLMError(f"{len(train)} training examples make no batch of {args.train_batch_size} "
                       f"for each of {world_size} processes")
    valid_loaders = {}
    for name in args.tasks:
        valid = examples[name][1]
        if len(valid) < world_size:
            raise VLMError(f"{args.dataset_paths[name]}: {len(valid)} validation examples "
                           f"for {world_size} processes")
        valid_loaders[name] = make_loader(valid[rank::world_size], valid[0]["task_id"], args.valid_batch_size,
                                          shuffle=False)
    return train_loader, valid_loaders
