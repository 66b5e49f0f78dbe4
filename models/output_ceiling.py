"""What a frozen output layer allows: the lowest NLL any last hidden state can give a token.

Prompt tuning, p-tuning, prefixes, adapters and LoRA all leave GPT-2's final LayerNorm (`ln_f`)
and its output layer (tied to the token embeddings) as they are. Whatever such a method does to
the hidden states, the next-token distribution is softmax(ln_f(h) @ E.T) for some h, so a token
whose output row is short, or points where many others point, has a probability no h can
exceed. On a small backbone this ceiling can sit far below what a task needs (the stand-in
never saw <|endoftext|> in pretraining, and rare words have short rows), and then no such method
can make the backbone say its answers with confidence, however it is trained.

`output_ceiling` finds that ceiling by gradient search over h, one h per token, starting from
the token's own output row. What it finds is reached by a real h, so the true ceiling is at
least that high; a better h may exist, but restarts from random points find none in practice.
"""
import torch


def output_ceiling(gpt2, token_ids, vocab=None, steps=300, lr=0.05, chunk=256):
    """Per token id, the lowest NLL of that token over all last hidden states h (before `ln_f`)
    of `gpt2` (a GPT2LMHeadModel), with ln_f and the output layer frozen. Returns a float list.
    vocab: the softmax runs over the first `vocab` rows (the tokens decoding draws from; default all).

    Runs in float32 on the model's device; the model itself is not changed."""
    ln_f = gpt2.transformer.ln_f
    rows = gpt2.get_output_embeddings().weight.detach().float()[:vocab]      # (V, d)
    weight, bias = ln_f.weight.detach().float(), ln_f.bias.detach().float()  # (d,)
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=rows.device)
    best = []
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]                                       # (k,)
        h = rows[part].clone().requires_grad_(True)                           # (k, d): start at the
                                                                              # token's row
        optimizer = torch.optim.Adam([h], lr=lr)
        lowest = torch.full((len(part),), float("inf"), device=rows.device)
        for _ in range(steps + 1):
            normed = torch.nn.functional.layer_norm(h, (h.shape[-1],), weight, bias, ln_f.eps)
            nll = -(normed @ rows.T).log_softmax(-1).gather(1, part[:, None])[:, 0]  # (k,)
            lowest = torch.minimum(lowest, nll.detach())
            optimizer.zero_grad()
            nll.sum().backward()  # each h only moves its own token's NLL
            optimizer.step()
        best += lowest.tolist()
    return best
