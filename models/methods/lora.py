"""`lora`: low-rank updates of chosen projections (Hu et al. 2021).

    out <- out + (alpha / r) * dropout(x) A^T B^T          A: (r, in), B: (out, r); B starts at 0

Targets: q, k, v (each its own slice of GPT-2's fused c_attn: columns 0-d, d-2d, 2d-3d),
attn_proj (attn.c_proj), mlp_fc (mlp.c_fc), mlp_proj (mlp.c_proj). GPT-2's projections are
Conv1D (weight (in, out), y = x W + b); A and B keep nn.Linear's (out, in) layout, as PEFT's
lora_A / lora_B weights do. Defaults are the paper's GPT-2 setting: rank 4, alpha 32, dropout
0.1 on W_q and W_v.

In a batch mixing tasks, all LoRA tasks' rows of a projection are done at once, Punica /
S-LoRA style: each row gathers its own task's A and B (ranks zero-padded to the largest; a zero
pair for rows of no LoRA task) and two batched matrix products over the whole batch apply them
(apply_batched_linear). The other way, one sub-batch per task (ROUTING = "slice"), is kept for
bench/run.py to compare.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.methods.base import Method

TARGETS = {"q": ("c_attn", 0), "k": ("c_attn", 1), "v": ("c_attn", 2), "attn_proj": ("attn.c_proj", None),
           "mlp_fc": ("mlp.c_fc", None), "mlp_proj": ("mlp.c_proj", None)}
ROUTING = "gather"  # or "slice"; bench/run.py measures both


class LowRankPair(nn.Module):
    def __init__(self, in_features, out_features, rank):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's init, as PEFT's lora_A


class LoRAMethod(Method):
    name = "lora"
    title = "low-rank updates of attention / MLP projections"
    reference = "Hu et al. 2021"
    points = frozenset({"linear"})
    defaults = {"r": 4, "alpha": 32.0, "dropout": 0.1, "targets": ["q", "v"]}
    help = {"r": "rank", "alpha": "scale numerator: updates are scaled by alpha / r",
            "dropout": "dropout on the input of the update",
            "targets": f"projections to adapt, comma-separated: {', '.join(TARGETS)}"}
    batched_linear = True

    def __init__(self, shape, options=None, backbone=None):
        super().__init__(shape, options, backbone)
        r = self.options["r"]
        self.pairs = nn.ModuleDict()
        for layer in range(shape.n_layer):
            for target in self.options["targets"]:
                projection, part = TARGETS[target]
                in_features, out_features = shape.linear_shape(projection)
                if part is not None:
                    out_features = shape.d_model
                self.pairs[f"{layer}_{target}"] = LowRankPair(in_features, out_features, r)
        self.drop = nn.Dropout(self.options["dropout"])
        self.scale = self.options["alpha"] / r

    @classmethod
    def check(cls, options, where):
        cls.require(options["r"] >= 1, where, f"r must be at least 1, got {options['r']}")
        cls.require(0 <= options["dropout"] < 1, where,
                    f"dropout must be in [0, 1), got {options['dropout']}")
        cls.require(options["targets"], where, "targets: name at least one projection")
        for target in options["targets"]:
            cls.require(target in TARGETS, where,
                        f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
        cls.require(len(set(options["targets"])) == len(options["targets"]), where, "a target is named twice")

    @classmethod
    def parameter_count(cls, shape, options):
        total = 0
        for target in options["targets"]:
            projection, part = TARGETS[target]
            in_features, out_features = shape.linear_shape(projection)
            total += options["r"] * (in_features + (shape.d_model if part is not None else out_features))
        return shape.n_layer * total

    def linear_targets(self):
        return {(layer, TARGETS[t][0]) for layer in range(self.shape.n_layer)
                for t in self.options["targets"]}

    def slice_keys(self, layer, name, width):
        """[(pair key, lo, hi)] of this layer's parts of projection `name` (output columns lo:hi)."""
        found = []
        for target in self.options["targets"]:
            projection, part = TARGETS[target]
            if projection == name:
                d = self.shape.d_model
                lo, hi = (part * d, (part + 1) * d) if part is not None else (0, width)
                found.append((f"{layer}_{target}", lo, hi))
        return found

    def slices(self, layer, name, width):
        """[(pair, lo, hi)] of this layer's updates to projection `name` (output columns lo:hi)."""
        return [(self.pairs[key], lo, hi) for key, lo, hi in self.slice_keys(layer, name, width)]

    def linear(self, layer, name, x, out):  # x: (n, T, in), out: (n, T, out)
        for pair, lo, hi in self.slices(layer, name, out.shape[-1]):
            delta = (self.drop(x) @ pair.A.t()) @ pair.B.t() * self.scale
            out = _add_columns(out, delta, lo, hi)
        return out

    @classmethod
    def apply_batched_linear(cls, layer, name, x, out, entries, routing):
        """All LoRA tasks' rows of one projection in one pass over the whole batch: entries
        [(method, rows)] (rows: LongTensor of a routing group). Row b takes slot slots[b] of the
        stacked weights: i + 1 for entries[i], 0 (a zero update, so out unchanged) for the rest."""
        if ROUTING == "slice":
            for method, rows in entries:
                out = out.index_copy(0, rows, method.linear(layer, name, x.index_select(0, rows),
                                                            out.index_select(0, rows)))
            return out
        methods = [method for method, _ in entries]
        slots = routing.row_slots([rows for _, rows in entries])                                # (batch,)
        scale = routing.memo(("lora_scale", x.dtype) + tuple(map(id, methods)), lambda: torch.tensor(
            [0.0] + [m.scale for m in methods], dtype=x.dtype,
            device=x.device)[slots][:, None, None])  # (batch, 1, 1)
        for method, rows in entries:  # each task's own dropout on its own rows (identity in eval)
            if method.drop.training and method.drop.p > 0:
                x = x.index_copy(0, rows, method.drop(x.index_select(0, rows)))
        width, pairs_at = out.shape[-1], {}
        for i, method in enumerate(methods):
            for pair, lo, hi in method.slices(layer, name, width):
                pairs_at.setdefault((lo, hi), {})[i + 1] = pair
        pieces, done = [], 0
        for lo, hi in sorted(pairs_at):
            pairs = pairs_at[(lo, hi)]
            rank = max(pair.A.shape[0] for pair in pairs.values())  # ranks zero-padded to the largest
            zero_a, zero_b = x.new_zeros(rank, x.shape[-1]), x.new_zeros(hi - lo, rank)
            a = torch.stack([_pad_rank(pairs[i].A, rank, 0) if i in pairs else zero_a
                             for i in range(len(methods) + 1)])                        # (k+1, r, in)
            b = torch.stack([_pad_rank(pairs[i].B, rank, 1) if i in pairs else zero_b
                             for i in range(len(methods) + 1)])                        # (k+1, out, r)
            h = torch.bmm(x, a.to(x.dtype).index_select(0, slots).transpose(1, 2))     # (batch, T, r)
            delta = (torch.bmm(h, b.to(x.dtype).index_select(0, slots).transpose(1, 2))
                     * scale)                                                          # (batch, T, hi-lo)
            pieces += [out[..., done:lo], out[..., lo:hi] + delta]
            done = hi
        pieces.append(out[..., done:])
        return torch.cat([p for p in pieces if p.shape[-1]], dim=-1)


def _pad_rank(weight, rank, dim):
    """A (r, in) or B (out, r) with zeros up to `rank` along its rank dimension `dim`."""
    missing = rank - weight.shape[dim]
    if not missing:
        return weight
    return F.pad(weight, (0, 0, 0, missing) if dim == 0 else (0, missing))


def _add_columns(out, delta, lo, hi):
    """out with delta added to its columns lo:hi (a new tensor; autograd-safe)."""
    if lo == 0 and hi == out.shape[-1]:
        return out + delta
    return torch.cat([out[..., :lo], out[..., lo:hi] + delta, out[..., hi:]], dim=-1)
