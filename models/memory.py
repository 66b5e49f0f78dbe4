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
GATED_ATTENTION = "vlm_sdpa_gated"

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
    """Hugging Face's SDPA attention; in training, recomputed in backward instead of stored.
    Rows with gated prefixes (UniPELT, see gated_prefix_attention) are computed with their gates."""
    gates = getattr(module, "vlm_prefix_gates", None)

    def core(query, key, value):
        out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0]
        for rows, gate, width in gates or ():
            out = gated_prefix_attention(out, rows, gate, width, query, key, value, attention_mask,
                                         kwargs.get("dropout", 0.0), kwargs.get("scaling"), module.training)
        return out

    if not (module.training and torch.is_grad_enabled()):
        return core(query, key, value), None
    return checkpoint(core, query, key, value, use_reentrant=False), None


def gated_prefix_attention(out, rows, gate, width, query, key, value, attention_mask, dropout, scaling,
                           training):
    """Attention of `rows` whose first `width` keys and values are a prefix scaled, for query
    position t, by that row's gate g_t (gate: (n, T) in (0, 1)): the prefix columns' scores are
    g_t q_t.k_j and their values g_t v_j. Math attention for those rows only; the others keep SDPA's.

    out (batch, T, heads, head_dim) as SDPA returned it; query (batch, heads, T, hd); key/value
    (batch, heads, K, hd); attention_mask: boolean (batch, 1, T, K), additive float, or None (causal)."""
    pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
    q, k, v = pick(query), pick(key), pick(value)
    T, K = q.shape[2], k.shape[2]
    g = gate.to(q.dtype)[:, None, :, None]                                     # (n, 1, T, 1)
    scores = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    scores = torch.cat([scores[..., :width] * g, scores[..., width:]], dim=-1)  # (n, heads, T, K)
    if attention_mask is None:
        allowed = (torch.arange(T, device=q.device)[:, None] + (K - T)
                   >= torch.arange(K, device=q.device)[None])
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~pick(attention_mask), float("-inf"))
    else:
        scores = scores + pick(attention_mask)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = torch.cat([probs[..., :width] * g, probs[..., width:]], dim=-1)
    if training and dropout:
        probs = torch.nn.functional.dropout(probs, dropout)
    gated = (probs @ v).transpose(1, 2)                                        # (n, T, heads, hd)
    return gated if rows is None else out.index_copy(0, rows, gated.to(out.dtype))


AttentionInterface.register(RECOMPUTED_ATTENTION, _recomputed_sdpa)
AttentionMaskInterface.register(RECOMPUTED_ATTENTION, sdpa_mask)
AttentionInterface.register(GATED_ATTENTION, _recomputed_sdpa)  # the same function: eval mode, gated rows
AttentionMaskInterface.register(GATED_ATTENTION, sdpa_mask)


def set_training_attention(gpt2, training, gated=False):
    """Recomputed attention in train mode, plain SDPA otherwise (only for a model that uses SDPA);
    a model with gated prefixes keeps our function in eval mode too (GATED_ATTENTION)."""
    now = gpt2.config._attn_implementation
    if now not in ("sdpa", RECOMPUTED_ATTENTION, GATED_ATTENTION):
        return
    want = RECOMPUTED_ATTENTION if training else GATED_ATTENTION if gated else "sdpa"
    if now != want:
        gpt2.set_attn_implementation(want)
