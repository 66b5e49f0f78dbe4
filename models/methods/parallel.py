"""`parallel`: the scaled parallel adapter beside the MLP (He et al. 2022, "Towards a Unified View
of Parameter-Efficient Transfer Learning").

    mlp_out <- mlp_out + s * (W_up ReLU(W_down x + b_down) + b_up)      x: the MLP's input

x is what the MLP reads, GPT-2's ln_2 output: the paper's equation takes the sub-layer's input
(AdapterHub's GPT-2 wiring feeds the un-normalized residual stream instead; we follow the paper).
Defaults: the paper's best configuration as AdapterHub's ParBnConfig has it: reduction factor 2
(b = d / 2, 384 on GPT-2 small), ReLU, s = 4, the "mam_adapter" init (W_down Kaiming-uniform,
W_up and both biases zero, so training starts from GPT-2 itself).
"""
import math

from torch import nn

from models.methods.base import Method
from models.methods.houlsby import Bottleneck, bottleneck_size

REDUCTION = 2


class ParallelAdapterMethod(Method):
    name = "parallel"
    title = "scaled parallel adapter beside the MLP"
    reference = "He et al. 2022"
    points = frozenset({"mlp_output"})
    defaults = {"bottleneck": 0, "scale": 4.0}
    help = {"bottleneck": f"bottleneck size b (0: d / {REDUCTION}, AdapterHub's reduction factor "
                          f"{REDUCTION})",
            "scale": "s, the adapter output's scale"}

    def __init__(self, shape, options=None, backbone=None):
        super().__init__(shape, options, backbone)
        b = bottleneck_size(shape, self.options, REDUCTION)
        self.adapters = nn.ModuleList()
        for _ in range(shape.n_layer):
            adapter = Bottleneck(shape.d_model, b, "relu")
            nn.init.kaiming_uniform_(adapter.down.weight, a=math.sqrt(5))
            for tensor in (adapter.down.bias, adapter.up.weight, adapter.up.bias):
                nn.init.zeros_(tensor)
            self.adapters.append(adapter)

    @classmethod
    def check(cls, options, where):
        cls.require(options["bottleneck"] >= 0, where,
                    f"bottleneck must be at least 1 (or 0: d / {REDUCTION}), got {options['bottleneck']}")
        cls.require(options["scale"] != 0, where, "scale must not be 0 (the adapter would do nothing)")

    @classmethod
    def parameter_count(cls, shape, options):
        return shape.n_layer * Bottleneck.count(shape.d_model, bottleneck_size(shape, options, REDUCTION))

    def mlp_output(self, layer, x, out):  # x: the MLP's input (n, T, d), out: its output
        return out + self.options["scale"] * self.adapters[layer](x)
