"""Residual adapters (Houlsby-style bottleneck, as in the authors' code) and the helpers that
decide what trains: the adapter method lives here, beside an untouched GPT-2."""
import torch
from torch import nn


class Adapter(nn.Module):
    """h + W_up ReLU(W_down LayerNorm(h) + b_down) + b_up, applied after a block's MLP residual."""

    def __init__(self, d_model, bottleneck, eps=1e-5, init_std=0.02):
        super().__init__()
        # Parameter names follow the authors' `adapter_block` so their weights map one to one.
        self.ln = nn.LayerNorm(d_model, eps=eps)
        self.project_down = nn.Linear(d_model, bottleneck)
        self.project_up = nn.Linear(bottleneck, d_model)
        # Same init as GPT-2's _init_weights in their code: N(0, 0.02) weights, zero biases.
        for linear in (self.project_down, self.project_up):
            nn.init.normal_(linear.weight, mean=0.0, std=init_std)
            nn.init.zeros_(linear.bias)

    @property
    def bottleneck(self):
        return self.project_down.out_features

    def forward(self, h):  # h: (..., d_model)
        return h + self.project_up(torch.relu(self.project_down(self.ln(h))))


def count_parameters(parameters):
    return sum(p.numel() for p in parameters)


def freeze_all(model):
    for p in model.parameters():
        p.requires_grad_(False)
