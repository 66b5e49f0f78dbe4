"""`ptuning`: virtual tokens made by a prompt encoder (Liu et al. 2021, "GPT Understands, Too";
NeMo's p-tuning).

While training, the task's virtual-token embeddings are the output of an encoder over n learned
inputs: a bidirectional LSTM with an MLP head (the paper's), or a three-layer MLP (encoder
"mlp"), built as PEFT's PromptEncoder is. After training only the encoder's output is kept
(`exported()`): the task's frozen row of a prompt table, n x d numbers, exactly what `prompt`
stores, and the encoder is dropped. Defaults: 10 virtual tokens, LSTM, hidden size d.
"""
import torch
from torch import nn

from models.methods.base import Method


class PromptEncoder(nn.Module):
    """PEFT's PromptEncoder layout: embedding, then LSTM + MLP head, or MLP."""

    def __init__(self, n, d, hidden, kind, layers):
        super().__init__()
        self.kind = kind
        self.embedding = nn.Embedding(n, d)
        if kind == "lstm":
            self.lstm_head = nn.LSTM(input_size=d, hidden_size=hidden, num_layers=layers, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                          nn.Linear(2 * hidden, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                          nn.ReLU(), nn.Linear(hidden, d))

    def forward(self):
        inputs = self.embedding.weight[None]                    # (1, n, d)
        if self.kind == "lstm":
            inputs = self.lstm_head(inputs)[0]                  # (1, n, 2 hidden)
        return self.mlp_head(inputs)[0]                         # (n, d)


class PTuningMethod(Method):
    name = "ptuning"
    title = "virtual tokens from a prompt encoder, kept as a frozen prompt-table row"
    reference = "Liu et al. 2021; NeMo"
    points = frozenset({"virtual"})
    dense_tensors = ("encoder.", "table")  # the saved form is the virtual tokens alone
    defaults = {"length": 10, "encoder": "lstm", "hidden": 0, "encoder_layers": 2, "reparameterize": True}
    help = {"length": "virtual tokens", "encoder": "lstm (the paper's) or mlp",
            "hidden": "encoder hidden size (0: the model width)", "encoder_layers": "LSTM layers",
            "reparameterize": "train through the encoder (the saved form is always its output)"}

    def __init__(self, shape, options=None, backbone=None):
        super().__init__(shape, options, backbone)
        o = self.options
        if o["reparameterize"]:
            self.encoder = PromptEncoder(o["length"], shape.d_model, o["hidden"] or shape.d_model,
                                         o["encoder"], o["encoder_layers"])
        else:
            self.table = nn.Parameter(torch.zeros(o["length"], shape.d_model))

    @classmethod
    def check(cls, options, where):
        cls.require(options["length"] >= 1, where, f"length must be at least 1, got {options['length']}")
        cls.require(options["encoder"] in ("lstm", "mlp"), where,
                    f"encoder must be lstm or mlp, got {options['encoder']!r}")
        cls.require(options["hidden"] >= 0, where,
                    f"hidden must be 0 (the model width) or more, got {options['hidden']}")
        cls.require(options["encoder_layers"] >= 1, where, "encoder_layers must be at least 1")

    @classmethod
    def parameter_count(cls, shape, options):
        n, d = options["length"], shape.d_model
        if not options["reparameterize"]:
            return n * d
        h = options["hidden"] or d
        if options["encoder"] == "mlp":
            return n * d + (d * h + h) + (h * h + h) + (h * d + d)
        lstm = 0
        for layer in range(options["encoder_layers"]):
            width = d if layer == 0 else 2 * h
            lstm += 2 * (4 * h * width + 4 * h * h + 8 * h)  # two directions: W_ih, W_hh, b_ih, b_hh
        return n * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)

    @property
    def num_virtual_tokens(self):
        return self.options["length"]

    def virtual_tokens(self):  # (n, d)
        return self.encoder() if self.options["reparameterize"] else self.table

    def exported(self):
        if not self.options["reparameterize"]:
            return self
        row = PTuningMethod(self.shape, dict(self.options, reparameterize=False))
        with torch.no_grad():
            row.table.copy_(self.encoder())
        return row.to(self.encoder.embedding.weight.device)
