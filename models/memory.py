"""Less activation memory in training, same values: what autograd keeps until backward.

- GELU: autograd through transformers' NewGELUActivation keeps several (batch, seq, 4 d)
  intermediates of the tanh formula per block, about half of GPT-2's activation memory. LeanGELU
  runs the original module (bit-identical values), saves only its input and recomputes the
  derivative in backward.
- Attention: on CPU, and wherever dropout is on, SDPA falls back to the math kernel, which keeps
  (batch, heads, seq, seq) scores, probabilities and dropout mask per block. In training the
  attention core is recomputed in backward instead (torch.utils.checkpoint, same random state, so
  the same dropout mask): a few percent more compute, growing savings with sequence length.
- The loss (VersatileLM._loss): the output layer and cross-entropy run over chunks of
  labelled positions, recomputed in backward, so (positions, 50,287) logits never exist whole.
Section 4 of bench/run.py measures the result.
"""
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.activations import NewGELUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

RECOMPUTED_ATTENTION = "vlm_sdpa_recompute"

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class _LeanGELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, original):
        ctx.save_for_backward(x)
        return original(x)

    @staticmethod
    def backward(ctx, grad):
        # d/dx 0.5 x (1 + tanh(u)), u = c (x + a x^3):  0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2)
        x, = ctx.saved_tensors
        t = torch.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
        slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
        return grad * slope, None


class LeanGELU(nn.Module):
    def __init__(self, original):
        super().__init__()
        self.original = original

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return _LeanGELUFunction.apply(x, self.original)
        return self.original(x)


def use_lean_gelu(gpt2):
    """Swap every block's NewGELUActivation for LeanGELU (no parameters change); returns the count."""
    swapped = 0
    for block in gpt2.transformer.h:
        if isinstance(block.mlp.act, NewGELUActivation):
            block.mlp.act = LeanGELU(block.mlp.act)
            swapped += 1
    return swapped


def _recomputed_sdpa(module, query, key, value, attention_mask, **kwargs):
    """Hugging Face's SDPA attention; in training, recomputed in backward instead of stored."""
    if not (module.training and torch.is_grad_enabled()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def core(query, key, value):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0]
    return checkpoint(core, query, key, value, use_reentrant=False), None


AttentionInterface.register(RECOMPUTED_ATTENTION, _recomputed_sdpa)
AttentionMaskInterface.register(RECOMPUTED_ATTENTION, sdpa_mask)


def set_training_attention(gpt2, training):
    """Recomputed attention in train mode, plain SDPA otherwise (only for a model that uses SDPA)."""
    now = gpt2.config._attn_implementation
    if training and now == "sdpa":
        gpt2.set_attn_implementation(RECOMPUTED_ATTENTION)
    elif not training and now == RECOMPUTED_ATTENTION:
        gpt2.set_attn_implementation("sdpa")
