"""`prefix`: per-layer key/value prefixes (Li & Liang 2021).

Every attention layer attends to P extra keys and values of the task's before the sequence's own;
the real tokens' positions start after them (position P), as in the paper's code and PEFT. The
prefixes train through a reparameterization MLP, P embeddings -> Linear(d, hidden) -> tanh ->
Linear(hidden, 2 L d), which the paper found to train stably; a checkpoint stores only its
output, the (P, 2 L d) prefix itself ("reparameterize": false). The layout of that tensor is
PEFT's: position, then (layer, key|value), then heads, then head_dim.
Defaults: the paper's table-to-text setting, prefix length 10, MLP hidden size 512.
"""
import torch
from torch import nn

from models.methods.base import Method


class PrefixMethod(Method):
    name = "prefix"
    title = "key/value prefixes in every attention layer"
    reference = "Li & Liang 2021"
    points = frozenset({"prefix"})
    dense_tensors = ("embedding.", "transform.", "prefixes")  # the saved form is the prefixes alone
    defaults = {"length": 10, "hidden": 512, "reparameterize": True}
    help = {"length": "prefix length P", "hidden": "hidden size of the reparameterization MLP",
            "reparameterize": "train through the MLP (the saved form is always the plain prefix)"}

    def __init__(self, shape, options=None, backbone=None):
        super().__init__(shape, options, backbone)
        P, width = self.options["length"], 2 * shape.n_layer * shape.d_model
        if self.options["reparameterize"]:
            self.embedding = nn.Embedding(P, shape.d_model)
            self.transform = nn.Sequential(nn.Linear(shape.d_model, self.options["hidden"]), nn.Tanh(),
                                           nn.Linear(self.options["hidden"], width))
        else:
            self.prefixes = nn.Parameter(torch.randn(P, width))  # (P, 2 L d): as nn.Embedding initializes

    @classmethod
    def check(cls, options, where):
        cls.require(options["length"] >= 1, where, f"length must be at least 1, got {options['length']}")
        cls.require(options["hidden"] >= 1, where, f"hidden must be at least 1, got {options['hidden']}")

    @classmethod
    def parameter_count(cls, shape, options):
        P, d, h, width = (options["length"], shape.d_model, options["hidden"],
                          2 * shape.n_layer * shape.d_model)
        if options["reparameterize"]:
            return P * d + (d * h + h) + (h * width + width)
        return P * width

    @property
    def prefix_length(self):
        return self.options["length"]

    def all_prefixes(self):
        """(P, 2 L d): the MLP's output, or the stored prefix."""
        if self.options["reparameterize"]:
            return self.transform(self.embedding.weight)
        return self.prefixes

    def prefix_kv(self):
        """[(key, value)] per layer, each (heads, P, head_dim)."""
        s = self.shape
        kv = self.all_prefixes().view(self.prefix_length, 2 * s.n_layer, s.n_head, s.head_dim)
        return [(kv[:, 2 * i].transpose(0, 1), kv[:, 2 * i + 1].transpose(0, 1)) for i in range(s.n_layer)]

    def exported(self):
        if not self.options["reparameterize"]:
            return self
        flat = PrefixMethod(self.shape, dict(self.options, reparameterize=False))
        with torch.no_grad():
            flat.prefixes.copy_(self.all_prefixes())
        return flat.to(self.embedding.weight.device)
