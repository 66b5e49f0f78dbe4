"""`krona`: Kronecker-product adapters in parallel to chosen projections (Edalati et al. 2022,
"KronA: Parameter Efficient Tuning with Kronecker Adapter").

    out <- out + s * dropout(x) (A (x) B)^T        A: (a1, a2), B: (out / a1, in / a2); A (x) B: (out, in)

computed without the (out, in) product: with x read as X (a2, in / a2) (row-major),
(A (x) B) vec(X) = vec(A X B^T), so the update is (A @ X @ B^T) flattened, (a1, out / a1) -> out.
Targets are LoRA's (models/methods/lora.py TARGETS: q, k, v slices of c_attn, attn_proj, mlp_fc,
mlp_proj); the paper adapts W_q and W_v, our default. A starts Kaiming-uniform (nn.Linear's, as
LoRA's A), B at zero, so a fresh task is GPT-2 (the paper's init).
Choices where the paper leaves them to tuning: a1 = a2 = the divisor of d closest to sqrt(d)
(ties: the smaller; 24 on GPT-2 small, so A is 24 x 24 and B 32 x 32: the two factors about
balanced, 1,600 numbers per matrix), s = 1, no dropout. a1 must divide each target's output
width and a2 its input width.
"""
import math

import torch
from torch import nn

from models.methods.base import Method
from models.methods.lora import TARGETS, _add_columns
from utils.errors import VLMError


def balanced_divisor(d):
    """The divisor of d closest to sqrt(d) (the smaller on a tie)."""
    return min((k for k in range(1, d + 1) if d % k == 0), key=lambda k: (abs(k - math.sqrt(d)), k))


def target_shape(shape, target):
    """(in, out) features of one target (a c_attn slice is d wide)."""
    projection, part = TARGETS[target]
    in_features, out_features = shape.linear_shape(projection)
    return in_features, shape.d_model if part is not None else out_features


def factor_sizes(shape, options):
    return options["a1"] or balanced_divisor(shape.d_model), options["a2"] or balanced_divisor(shape.d_model)


def kron_apply(x, A, B):
    """x (A (x) B)^T for x (..., a2 * bi), A (a1, a2), B (bo, bi): (..., a1 * bo)."""
    a1, a2 = A.shape
    bo, bi = B.shape
    X = x.reshape(*x.shape[:-1], a2, bi)
    Y = A.to(x.dtype) @ (X @ B.t().to(x.dtype))                       # (..., a1, bo)
    return Y.reshape(*x.shape[:-1], a1 * bo)


class KronPair(nn.Module):
    def __init__(self, a1, a2, in_features, out_features):
        super().__init__()
        self.A = nn.Parameter(torch.empty(a1, a2))
        self.B = nn.Parameter(torch.zeros(out_features // a1, in_features // a2))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))


class KronAMethod(Method):
    name = "krona"
    title = "Kronecker-product updates of attention / MLP projections"
    reference = "Edalati et al. 2022"
    points = frozenset({"linear"})
    defaults = {"a1": 0, "a2": 0, "scale": 1.0, "dropout": 0.0, "targets": ["q", "v"]}
    help = {"a1": "rows of A (0: the divisor of d closest to sqrt(d)); divides each target's output width",
            "a2": "columns of A (0: as a1); divides each target's input width",
            "scale": "s, the update's scale", "dropout": "dropout on the input of the update",
            "targets": f"projections to adapt, comma-separated: {', '.join(TARGETS)}"}

    def __init__(self, shape, options=None, backbone=None):
        super().__init__(shape, options, backbone)
        a1, a2 = factor_sizes(shape, self.options)
        where = f"--method {self.name}"
        for target in self.options["targets"]:
            in_features, out_features = target_shape(shape, target)
            if out_features % a1:
                raise VLMError(f"{where}: a1={a1} must divide the output width {out_features} of target "
                               f"{target}")
            if in_features % a2:
                raise VLMError(f"{where}: a2={a2} must divide the input width {in_features} of target "
                               f"{target}")
        self.pairs = nn.ModuleDict()
        for layer in range(shape.n_layer):
            for target in self.options["targets"]:
                self.pairs[f"{layer}_{target}"] = KronPair(a1, a2, *target_shape(shape, target))
        self.drop = nn.Dropout(self.options["dropout"])

    @classmethod
    def check(cls, options, where):
        cls.require(options["a1"] >= 0, where,
                    f"a1 must be at least 1 (or 0: automatic), got {options['a1']}")
        cls.require(options["a2"] >= 0, where,
                    f"a2 must be at least 1 (or 0: automatic), got {options['a2']}")
        cls.require(0 <= options["dropout"] < 1, where,
                    f"dropout must be in [0, 1), got {options['dropout']}")
        cls.require(options["targets"], where, "targets: name at least one projection")
        for target in options["targets"]:
            cls.require(target in TARGETS, where,
                        f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
        cls.require(len(set(options["targets"])) == len(options["targets"]), where, "a target is named twice")

    @classmethod
    def parameter_count(cls, shape, options):
        a1, a2 = factor_sizes(shape, options)
        total = 0
        for target in options["targets"]:
            in_features, out_features = target_shape(shape, target)
            total += a1 * a2 + (out_features // a1) * (in_features // a2)
        return shape.n_layer * total

    def linear_targets(self):
        return {(layer, TARGETS[t][0]) for layer in range(self.shape.n_layer)
                for t in self.options["targets"]}

    def linear(self, layer, name, x, out):  # x: (n, T, in), out: (n, T, out)
        d = self.shape.d_model
        for target in self.options["targets"]:
            projection, part = TARGETS[target]
            if projection != name:
                continue
            lo, hi = (part * d, (part + 1) * d) if part is not None else (0, out.shape[-1])
            pair = self.pairs[f"{layer}_{target}"]
            out = _add_columns(out, kron_apply(self.drop(x), pair.A, pair.B) * self.options["scale"], lo, hi)
        return out
