"""`houlsby`: bottleneck adapters after the attention and after the MLP of every block (Houlsby
et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

    out <- out + W_up f(W_down out + b_down) + b_up        W_down: d x b, W_up: b x d, f = swish

`out` is a sub-layer's output (attention after its c_proj, MLP after its c_proj, each after
GPT-2's residual dropout) before its residual add, as in the paper's Figure 2; AdapterHub's
DoubleSeqBnConfig wires GPT-2 the same way (mh_adapter + output_adapter, original_ln_before False).
Defaults: AdapterHub's DoubleSeqBnConfig, reduction factor 16 (b = d / 16, 48 on GPT-2 small) and
swish. Init: the paper's near-identity one, weights N(0, 1e-2) truncated at two standard
deviations and zero biases (AdapterHub's init_weights "houlsby"), so each adapter starts close
to the identity.

`Bottleneck` is shared with `parallel` and `unipelt`.
"""
import torch.nn.functional as F
from torch import nn

from models.methods.base import Method

ACTIVATIONS = {"swish": F.silu, "relu": F.relu, "gelu": F.gelu}  # gelu: the exact (erf) one,
                                                                 # as transformers' "gelu"
REDUCTION = 16


class Bottleneck(nn.Module):
    """W_up f(W_down x + b_down) + b_up, nn.Linear layout (weights (out, in))."""

    def __init__(self, d, b, activation):
        super().__init__()
        self.activation = activation
        self.down = nn.Linear(d, b)
        self.up = nn.Linear(b, d)

    def forward(self, x):
        return self.up(ACTIVATIONS[self.activation](self.down(x)))

    def init_near_identity(self, std=1e-2):
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(linear.bias)
        return self

    @staticmethod
    def count(d, b):
        return d * b + b + b * d + d


def bottleneck_size(shape, options, reduction):
    return options["bottleneck"] or max(1, shape.d_model // reduction)


class HoulsbyMethod(Method):
    name = "houlsby"
    title = "bottleneck adapters after attention and after the MLP of every block"
    reference = "Houlsby et al. 2019"
    points = frozenset({"attn_output", "mlp_output"})
    defaults = {"bottleneck": 0}
    help = {"bottleneck": f"bottleneck size b (0: d / {REDUCTION}, AdapterHub's reduction factor "
                          f"{REDUCTION})"}

    def __init__(self, shape, options=None, backbone=None):
        super().__init__(shape, options, backbone)
        b = bottleneck_size(shape, self.options, REDUCTION)
        self.adapters = nn.ModuleDict()
        for layer in range(shape.n_layer):
            for where in ("attn", "mlp"):
                self.adapters[f"{layer}_{where}"] = Bottleneck(shape.d_model, b, "swish").init_near_identity()

    @classmethod
    def check(cls, options, where):
        cls.require(options["bottleneck"] >= 0, where,
                    f"bottleneck must be at least 1 (or 0: d / {REDUCTION}), got {options['bottleneck']}")

    @classmethod
    def parameter_count(cls, shape, options):
        return shape.n_layer * 2 * Bottleneck.count(shape.d_model, bottleneck_size(shape, options, REDUCTION))

    def attn_output(self, layer, x, out):  # out: (n, T, d)
        return out + self.adapters[f"{layer}_attn"](out)

    def mlp_output(self, layer, x, out):
        return out + self.adapters[f"{layer}_mlp"](out)
