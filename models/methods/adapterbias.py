"""`adapterbias`: a token-dependent shift of the MLP's output (Fu et al. 2022, "AdapterBias:
Parameter-efficient Token-dependent Representation Shift for Adapters in NLP Tasks").

    mlp_out <- mlp_out + alpha_t v        alpha_t = L_alpha(r_t) = w . r_t + c (one number per token)

v (d) is the layer's shift vector, L_alpha a linear layer to one output. What L_alpha reads:
the paper says the shift is "a vector and a linear layer" added to the output of the FFN; the
authors' code (github.com/Allen0307/AdapterBias, BertOutput) computes alpha from the FFN's
intermediate activation, the input of its second linear layer (Linear(intermediate_size, 1)),
and adds alpha v to that layer's output. That is our default, score_input "inner": r_t is the
input of GPT-2's mlp.c_proj (d_inner wide), the shift is added to its output (point "linear" on
mlp.c_proj, before GPT-2's residual dropout, where the authors' code adds it after BERT's; the
same in eval). score_input "output" reads r_t = the MLP's output instead (a d -> 1 layer; point
mlp_output). share_alpha: one L_alpha for all layers (the authors' --share_alpha).
Init as the authors' code gets it: v = 0 (a fresh task is GPT-2), L_alpha N(0, 0.02) with zero
bias (BERT's _init_weights).
"""
import torch
from torch import nn

from models.methods.base import Method

SCORE_INPUTS = ("inner", "output")


class AdapterBiasMethod(Method):
    name = "adapterbias"
    title = "token-dependent shift of each MLP's output: a vector times a linear score"
    reference = "Fu et al. 2022"
    points = frozenset({"linear"})  # per instance: {"linear"} (score_input inner) or {"mlp_output"}
    dense_tensors = ("vectors",)  # a shift vector per layer; L_alpha are (1, width) rows: nothing to prune
    defaults = {"score_input": "inner", "share_alpha": False}
    help = {"score_input": "what L_alpha reads: inner (the MLP's hidden activation, the authors' code) "
                           "or output (the MLP's output)",
            "share_alpha": "one L_alpha shared by all layers"}

    def __init__(self, shape, options=None, backbone=None):
        super().__init__(shape, options, backbone)
        inner = self.options["score_input"] == "inner"
        self.points = frozenset({"linear"}) if inner else frozenset({"mlp_output"})
        width = shape.d_inner if inner else shape.d_model
        self.vectors = nn.Parameter(torch.zeros(shape.n_layer, shape.d_model))
        self.alphas = nn.ModuleList([nn.Linear(width, 1) for _ in range(1 if self.options["share_alpha"]
                                                                          else shape.n_layer)])
        for linear in self.alphas:
            nn.init.normal_(linear.weight, mean=0.0, std=0.02)
            nn.init.zeros_(linear.bias)

    @classmethod
    def check(cls, options, where):
        cls.require(options["score_input"] in SCORE_INPUTS, where,
                    f"score_input must be {' or '.join(SCORE_INPUTS)}, got {options['score_input']!r}")

    @classmethod
    def parameter_count(cls, shape, options):
        width = shape.d_inner if options["score_input"] == "inner" else shape.d_model
        return shape.n_layer * shape.d_model + (1 if options["share_alpha"] else shape.n_layer) * (width + 1)

    def linear_targets(self):
        if self.options["score_input"] != "inner":
            return set()
        return {(layer, "mlp.c_proj") for layer in range(self.shape.n_layer)}

    def shift(self, layer, r, out):
        alpha = self.alphas[0 if self.options["share_alpha"] else layer](r)  # (n, T, 1)
        return out + alpha * self.vectors[layer]

    def linear(self, layer, name, x, out):  # mlp.c_proj: x (n, T, d_inner), out (n, T, d)
        return self.shift(layer, x, out)

    def mlp_output(self, layer, x, out):
        return self.shift(layer, out, out)
