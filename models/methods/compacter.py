"""`compacter`: adapters whose projections are parameterized hypercomplex multiplication (PHM)
layers (Karimi Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers").

    out <- out + PHM_up(GELU(PHM_down(out)))            after attention and after the MLP (Houlsby's places)
    PHM(x) = x W + b,   W = sum_i A_i (x) B_i,   B_i = s_i t_i^T

A_i (n x n, i = 1..n) are the "slow" weights: ONE (n, n, n) tensor per task, shared by every
PHM layer of the task (all layers, both places, down and up); B_i ((in/n) x (out/n)) are each
layer's "fast" weights, rank-r products s_i t_i^T (rank 1 by default). This is AdapterHub's
PHMLayer with CompacterConfig (shared_phm_rule, factorized_phm_W, not shared_W_phm, phm_bias):
W (in, out) is applied as x @ W, with (x) the Kronecker product (torch.kron's index order).
Defaults: CompacterConfig's: n = 4, reduction factor 32 (b = d / 32 rounded to a multiple of n,
24 on GPT-2 small; 4, not 2, on a 64-wide model), GELU
(the exact one, transformers' "gelu"), rank 1, a PHM bias. Init as AdapterHub's: A ~ N(0, 1e-4)
(phm_init_range), each s_i and t_i Glorot-normal (AdapterHub's init_W takes that branch for its
default "glorot-uniform", a quirk we keep), biases zero: the adapters start near the identity.
d and b must be multiples of n.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.methods.base import Method
from utils.errors import VLMError

REDUCTION = 32
RULE_INIT_STD = 1e-4


class PHMLinear(nn.Module):
    """One PHM layer's own tensors: the factorized fast weights and the bias."""

    def __init__(self, n, in_features, out_features, rank, bias):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.left = nn.Parameter(torch.empty(n, in_features // n, rank))    # s_i
        self.right = nn.Parameter(torch.empty(n, rank, out_features // n))  # t_i^T
        for i in range(n):
            nn.init.xavier_normal_(self.left.data[i])
            nn.init.xavier_normal_(self.right.data[i])
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def weight(self, rule):
        """W (in, out) = sum_i kron(rule[i], left[i] @ right[i])."""
        fast = torch.bmm(self.left, self.right)                           # (n, in/n, out/n)
        n = rule.shape[0]
        w = torch.einsum("ipr,iqs->pqrs", rule, fast)                     # (n, in/n, n, out/n)
        return w.reshape(n * fast.shape[1], n * fast.shape[2])

    def forward(self, x, rule):
        y = x @ self.weight(rule).to(x.dtype)
        return y + self.bias if self.bias is not None else y

    @staticmethod
    def count(in_features, out_features, rank, bias):
        return rank * (in_features + out_features) + (out_features if bias else 0)


class CompacterAdapter(nn.Module):
    def __init__(self, n, d, b, rank, bias):
        super().__init__()
        self.down = PHMLinear(n, d, b, rank, bias)
        self.up = PHMLinear(n, b, d, rank, bias)

    def forward(self, x, rule):
        return self.up(F.gelu(self.down(x, rule)), rule)


def bottleneck_size(shape, options):
    """The bottleneck option, or d / 32 rounded to a multiple of phm_dim (at least phm_dim), so the
    default fits any width: 24 on GPT-2 small, 4 on a 64-wide model (where d / 32 is 2)."""
    n = options["phm_dim"]
    return options["bottleneck"] or n * max(1, round(shape.d_model / REDUCTION / n))


class CompacterMethod(Method):
    name = "compacter"
    title = "PHM adapters after attention and MLP: shared slow weights, per-layer rank-1 fast weights"
    reference = "Karimi Mahabadi et al. 2021"
    points = frozenset({"attn_output", "mlp_output"})
    defaults = {"bottleneck": 0, "phm_dim": 4, "phm_rank": 1, "phm_bias": True}
    help = {"bottleneck": f"bottleneck size b (0: d / {REDUCTION} rounded to a multiple of phm_dim); "
                          "a multiple of phm_dim",
            "phm_dim": "n: number of Kronecker terms and size of the shared A_i",
            "phm_rank": "rank of each fast weight B_i", "phm_bias": "a bias in every PHM layer"}

    def __init__(self, shape, options=None, backbone=None):
        super().__init__(shape, options, backbone)
        o = self.options
        n, d, b = o["phm_dim"], shape.d_model, bottleneck_size(shape, o)
        where = f"--method {self.name}"
        if d % n:
            raise VLMError(f"{where}: phm_dim {n} must divide the model width {d}")
        if b % n:
            raise VLMError(f"{where}: phm_dim {n} must divide the bottleneck {b} "
                           f"(set bottleneck to a multiple of {n})")
        self.rule = nn.Parameter(torch.empty(n, n, n))  # A_1..A_n, shared by all the task's PHM layers
        nn.init.normal_(self.rule, mean=0.0, std=RULE_INIT_STD)
        self.adapters = nn.ModuleDict()
        for layer in range(shape.n_layer):
            for place in ("attn", "mlp"):
                self.adapters[f"{layer}_{place}"] = CompacterAdapter(n, d, b, o["phm_rank"], o["phm_bias"])

    @classmethod
    def check(cls, options, where):
        cls.require(options["bottleneck"] >= 0, where,
                    f"bottleneck must be at least 1 (or 0: d / {REDUCTION}), got {options['bottleneck']}")
        cls.require(options["phm_dim"] >= 1, where, f"phm_dim must be at least 1, got {options['phm_dim']}")
        cls.require(options["phm_rank"] >= 1, where,
                    f"phm_rank must be at least 1, got {options['phm_rank']}")

    @classmethod
    def parameter_count(cls, shape, options):
        n, d, b, r, bias = (options["phm_dim"], shape.d_model, bottleneck_size(shape, options),
                            options["phm_rank"], options["phm_bias"])
        adapter = PHMLinear.count(d, b, r, bias) + PHMLinear.count(b, d, r, bias)
        return n ** 3 + shape.n_layer * 2 * adapter

    def attn_output(self, layer, x, out):  # out: (n, T, d)
        return out + self.adapters[f"{layer}_attn"](out, self.rule)

    def mlp_output(self, layer, x, out):
        return out + self.adapters[f"{layer}_mlp"](out, self.rule)
