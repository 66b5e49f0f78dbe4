"""train_vlm.py's task sampling: each epoch draws c_t examples of task t with c_t proportional to
n_t^(1/T) (n_t: the task's training examples, T: --temperature) and sum(c_t) = sum(n_t), so an
epoch always has the same size. T = 1 draws every example exactly once; T > 1 flattens the task
shares toward uniform (small tasks repeated, large ones subsampled); T = inf is uniform."""
import math
import random
from itertools import chain

import torch

from utils.data import length_grouped_batches
from utils.errors import VLMError


def check_temperature(value):
    # inf is allowed: every task gets the same share (n^0 = 1).
    if value is None or math.isnan(value) or value <= 0:
        raise VLMError(f"--temperature must be a positive number (1: proportional to dataset size), "
                       f"got {value}")


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
            batches = length_grouped_batches(chain.from_iterable(drawn.values()), self.lengths,
                                             self.batch_size, self.pool, rng)
        else:
            batches = [b for task in self.tasks
                       for b in length_grouped_batches(drawn[task], self.lengths, self.batch_size, self.pool,
                                                       rng)]
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
