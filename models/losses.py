"""The output layer and cross-entropy in one autograd function, over chunks of positions.

For a small GPT-2 the output layer is most of the compute: (positions, d) @ (d, 50,257). Done
the plain way (logits, log_softmax, nll_loss) autograd keeps the (positions, 50,257) logits and
their log-softmax, then zero-fills and scatters a gradient of the same size. Here the forward
keeps only each position's log-sum-exp; the backward recomputes one chunk of logits at a time
and turns it into the gradient in place (softmax minus one-hot), so memory holds one chunk and
each chunk is read and written a few times instead of a dozen.

    total = linear_cross_entropy(hidden (n, d), weight (vocab, d), targets (n,))   # summed NLL, float32
"""
import torch

DEFAULT_CHUNK = 2048  # positions per chunk: (2048, 50,257) float32 logits = 0.4 GB at a time


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, keep):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kept = []
        for start in range(0, n, chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = (h @ weight.t().to(h.dtype)).float()                     # (c, vocab)
            chunk_lse = torch.logsumexp(logits, dim=1)
            lse[start:start + chunk] = chunk_lse
            total += (chunk_lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if keep:
                kept.append(logits.sub_(chunk_lse[:, None]).exp_())          # softmax, for backward
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.kept = chunk, kept
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight
                       else None)
        w = weight.to(hidden.dtype)
        for index, start in enumerate(range(0, hidden.shape[0], ctx.chunk)):
            h, t = hidden[start:start + ctx.chunk], targets[start:start + ctx.chunk]
            if ctx.kept:
                grad, ctx.kept[index] = ctx.kept[index], None
            else:  # recompute this chunk's logits
                grad = (h @ w.t()).float()
                grad.sub_(lse[start:start + ctx.chunk, None]).exp_()         # softmax
            grad[torch.arange(len(t), device=grad.device), t] -= 1.0         # minus one-hot
            grad.mul_(grad_total)
            if want_hidden:
                grad_hidden[start:start + ctx.chunk] = (grad.to(hidden.dtype) @ w)
            if want_weight:
                grad_weight.addmm_(grad.t(), h.float())
        return grad_hidden, grad_weight.to(weight.dtype) if want_weight else None, None, None, None


def linear_cross_entropy(hidden, weight, targets, chunk=DEFAULT_CHUNK, keep=False):
    """Summed next-token NLL of `hidden @ weight.T` against `targets` (float32 scalar); the same value
    as F.cross_entropy(hidden @ weight.T, targets, reduction="sum") up to float rounding.

    keep=True keeps every chunk's softmax for backward (positions x vocab floats of memory) instead
    of recomputing its logits: one matrix product fewer, for pretraining where memory is plenty."""
    keep = keep and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, keep)
