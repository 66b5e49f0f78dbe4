"""One routing object per forward pass: which rows belong to which task, and so which methods act
on which rows at every attachment point. models/vlm.py builds it once from the batch's task ids
and every hook reads it; nothing is decided again layer by layer.

Also the key/value cache that carries prefix-tuning prefixes (PrefixCache): it remembers which
prefix columns are real for each row, so later decoding steps extend the attention mask the same
way, also after finished rows leave the batch.
"""
import torch
from transformers import DynamicCache

from utils.errors import VLMError


class Routing:
    """Built from task_ids (batch,): a task id per row, -1 for plain GPT-2.

    groups: [(TaskModule, rows)] for the tasks present, rows a LongTensor of row indices, or None
    when the whole batch is that one task (its methods then run exactly as in a one-task model).
    entries(point): [(method, rows)] in the order tasks and their methods apply."""

    def __init__(self, model, task_ids, batch_size, device):
        self.batch_size = batch_size
        if isinstance(task_ids, int):
            task_ids = [task_ids] * batch_size
        elif torch.is_tensor(task_ids):
            task_ids = task_ids.tolist()  # one host sync per forward, not one per layer
        task_ids = list(task_ids)
        if len(task_ids) != batch_size:
            raise ValueError(f"task_ids has {len(task_ids)} entries for a batch of {batch_size}")
        by_id = model.tasks_by_id()
        rows_by_task = {}
        for row, task_id in enumerate(task_ids):
            if task_id == -1:
                continue
            if task_id not in by_id:
                raise VLMError(f"task id {task_id} has no module in this model "
                               f"(has: {', '.join(f'{t.name}={i}' for i, t in by_id.items()) or 'none'})")
            rows_by_task.setdefault(task_id, []).append(row)
        self.task_ids = task_ids
        self.device = device
        self.groups = []
        self._host_rows = {}  # id(row index tensor) -> its rows as a list, for row_slots
        self._memo = {}
        for task_id in sorted(rows_by_task):
            rows = rows_by_task[task_id]
            index = None if len(rows) == batch_size else torch.tensor(rows, device=device)
            if index is not None:
                self._host_rows[id(index)] = rows
            self.groups.append((by_id[task_id], index))
        self._entries = {}
        self._linear = {}
        for task, rows in self.groups:
            for method in task.methods.values():
                for point in method.points:
                    self._entries.setdefault(point, []).append((method, rows))
                for target in method.linear_targets():
                    self._linear.setdefault(target, []).append((method, rows))

    def entries(self, point):
        return self._entries.get(point, ())

    def linear_entries(self, layer, name):
        return self._linear.get((layer, name), ())

    @property
    def empty(self):
        return not self._entries

    def row_slots(self, row_indices):
        """(batch,) LongTensor on the batch's device: i + 1 for the rows of row_indices[i] (row
        index tensors of this routing's groups), 0 for every other row. Built on the host once per
        forward for each list of groups, so the layers that share it add no host-device copies."""
        def build():
            slots = [0] * self.batch_size
            for i, rows in enumerate(row_indices):
                for row in self._host_rows[id(rows)]:
                    slots[row] = i + 1
            return torch.tensor(slots, device=self.device)
        return self.memo(("slots",) + tuple(id(rows) for rows in row_indices), build)

    def memo(self, key, build):
        """build() once per forward for `key` (a value every layer would otherwise rebuild)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def row_index(self, rows):
        """rows as a LongTensor (None means every row)."""
        if rows is None:
            return torch.arange(self.batch_size)
        return rows


def apply_by_rows(entries, value, fn):
    """value (batch, ...) with fn(method, value[rows]) written back into each entry's rows.

    A whole-batch entry (rows None) gets fn(method, value) unchanged: the same arithmetic as a
    model holding only that task, so a combined model equals each single-task one exactly."""
    for method, rows in entries:
        if rows is None:
            value = fn(method, value, None)
        else:
            value = value.index_copy(0, rows, fn(method, value.index_select(0, rows), rows))
    return value


class PrefixCache(DynamicCache):
    """A DynamicCache whose first P positions of every layer are prefix-tuning prefixes.

    prefix_mask (batch, P): 1 where a row's prefix is (rows with shorter or no prefixes are
    padded on the left); prefix_lengths (batch,): each row's P_t, by which its positions shift."""

    def __init__(self, prefix_mask, prefix_lengths, config=None):
        super().__init__(config=config)
        self.prefix_mask = prefix_mask
        self.prefix_lengths = prefix_lengths

    @property
    def prefix_width(self):
        return self.prefix_mask.shape[1]

    def real_length(self):
        """Positions of real tokens already cached (beyond the prefix)."""
        return self.get_seq_length() - self.prefix_width

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self.prefix_mask = self.prefix_mask[indices]
        self.prefix_lengths = self.prefix_lengths[indices]

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self.prefix_mask = self.prefix_mask[beam_idx]
        self.prefix_lengths = self.prefix_lengths[beam_idx]
