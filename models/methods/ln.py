"""`ln`: LN-tuning, per-task gain and bias of every LayerNorm (Qi et al. 2022, "Parameter-Efficient
Tuning on Layer Normalization for Pre-trained Language Models").

    LN_task(x) = (x - mean(x)) / sqrt(var(x) + eps) * w_task + b_task

for ln_1 and ln_2 of every block and the final ln_f, each starting from the backbone's own
(w, b), so a fresh task is exactly GPT-2; eps is the backbone's. No options: the paper tunes all
LayerNorms and nothing else. PEFT's LNTuningConfig does the same (a trainable copy of each
LayerNorm); tests/test_methods_more.py loads our tensors into it and compares logits.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.methods.base import Method


class LNTuningMethod(Method):
    name = "ln"
    title = "per-task gain and bias of every LayerNorm"
    reference = "Qi et al. 2022"
    points = frozenset({"layer_norm"})
    defaults = {}
    help = {}

    def __init__(self, shape, options=None, backbone=None):
        super().__init__(shape, options, backbone)
        self.norms = nn.ModuleDict()
        for layer, name in self.norm_names():
            norm = nn.LayerNorm(shape.d_model, eps=shape.eps)
            if backbone is not None:
                source = (backbone.transformer.ln_f if layer == -1
                          else getattr(backbone.transformer.h[layer], name))
                with torch.no_grad():
                    norm.weight.copy_(source.weight.detach())
                    norm.bias.copy_(source.bias.detach())
            self.norms[self.key(layer, name)] = norm

    def norm_names(self):
        """[(layer, name)]: ln_1, ln_2 of each block, then ln_f (layer -1)."""
        return [(i, n) for i in range(self.shape.n_layer) for n in ("ln_1", "ln_2")] + [(-1, "ln_f")]

    @staticmethod
    def key(layer, name):
        return "ln_f" if layer == -1 else f"{layer}_{name}"

    @classmethod
    def parameter_count(cls, shape, options):
        return (2 * shape.n_layer + 1) * 2 * shape.d_model

    def layer_norm(self, layer, name, x):  # x: the LayerNorm's input (n, T, d)
        norm = self.norms[self.key(layer, name)]
        return F.layer_norm(x, (self.shape.d_model,), norm.weight, norm.bias, norm.eps)
