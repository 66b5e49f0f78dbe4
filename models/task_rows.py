"""Task embeddings that train without making GPT-2's whole token table trainable.

GPT-2 ties its input embedding to its output layer. Training ~30 special-token rows through that
table would make all 50,287 x d entries a parameter: a dense gradient and two Adam moments for the
table, and an output-layer weight gradient (as costly as the output layer's forward pass) at every
step. Here the table stays frozen; each task's rows (a contiguous id range) become a parameter
that is a *view* of the table's storage, so

- the optimizer's in-place updates land in the table itself: checkpoints and no-grad forward
  passes (validation, decoding) read the current rows, with nothing to copy back;
- two hooks route gradient to the views, from the input lookup and from the output layer, while
  forward values are untouched (bit-identical to the plain model).
"""
import torch
from torch import nn


class TaskRows(nn.Module):
    """`rows[task]`: (n_task_tokens, d) trainable view of that task's rows of the tied table."""

    def __init__(self, gpt2, rows_by_task):
        super().__init__()
        table = gpt2.get_input_embeddings().weight                     # (vocab, d)
        if gpt2.get_output_embeddings().weight is not table:
            raise ValueError("TaskRows needs the output layer tied to the input embeddings (GPT-2's layout)")
        self.rows = nn.ParameterDict()
        self.starts = {}
        for task, ids in rows_by_task.items():
            start, stop = min(ids), max(ids) + 1
            if sorted(ids) != list(range(start, stop)):
                raise ValueError(f"{task}: special-token ids {ids} are not one contiguous range")
            self.rows[task] = nn.Parameter(table.data[start:stop])      # a view: same storage
            self.starts[task] = start
        self._handles = [gpt2.get_input_embeddings().register_forward_hook(self._input_hook),
                         gpt2.get_output_embeddings().register_forward_hook(self._output_hook)]

    def detach_hooks(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _input_hook(self, module, args, embeddings):
        # Called for input_ids and for token_type_ids (GPT-2 embeds segments with the same table).
        if not torch.is_grad_enabled():
            return embeddings
        for task, rows in self.rows.items():
            embeddings = _InputRowsGradient.apply(embeddings, args[0], rows, self.starts[task])
        return embeddings

    def _output_hook(self, module, args, logits):
        if not torch.is_grad_enabled():
            return logits
        for task, rows in self.rows.items():
            logits = _OutputRowsGradient.apply(logits, args[0], rows, self.starts[task])
        return logits


class _InputRowsGradient(torch.autograd.Function):
    """Identity on embeddings (batch, seq, d) looked up for ids (batch, seq). Backward: the
    gradient at positions holding ids start..start+n-1, summed per id, goes to rows (n, d)."""

    @staticmethod
    def forward(ctx, embeddings, ids, rows, start):
        ctx.save_for_backward(ids)
        ctx.start, ctx.n, ctx.dtype = start, rows.shape[0], rows.dtype
        return embeddings

    @staticmethod
    def backward(ctx, grad):
        ids, = ctx.saved_tensors
        local = ids - ctx.start
        index = torch.where((local >= 0) & (local < ctx.n), local, ctx.n).reshape(-1)  # n: a discard row
        d = grad.shape[-1]
        grad_rows = grad.new_zeros(ctx.n + 1, d).index_add_(0, index, grad.reshape(-1, d))[:ctx.n]
        return grad, None, grad_rows.to(ctx.dtype), None


class _OutputRowsGradient(torch.autograd.Function):
    """Identity on logits (..., vocab) = hidden (..., d) @ table.T. Backward: the columns
    start..start+n-1 give rows (n, d) their weight gradient. Hidden's gradient already comes
    whole from the frozen output layer, whose table holds these very rows."""

    @staticmethod
    def forward(ctx, logits, hidden, rows, start):
        ctx.save_for_backward(hidden)
        ctx.start, ctx.n, ctx.dtype = start, rows.shape[0], rows.dtype
        return logits

    @staticmethod
    def backward(ctx, grad):
        hidden, = ctx.saved_tensors
        columns = grad[..., ctx.start:ctx.start + ctx.n].reshape(-1, ctx.n)           # (tokens, n)
        grad_rows = columns.t().to(hidden.dtype) @ hidden.reshape(-1, hidden.shape[-1])  # (n, d)
        return grad, None, grad_rows.to(ctx.dtype), None
