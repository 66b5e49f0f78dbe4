"""A fresh GPT-2 whose first two layers hold an induction circuit set by hand.

Why: a small model pretrained on a CPU budget never finds induction heads (the circuit that
lets a transformer copy from its context). On repeated random spans it stays on the loss plateau
(measured: 350-550 steps from scratch or from the stand-in v1, lr 1e-3 and 3e-3, all 50,256 ids or
2,000 of them: the repeat never dropped below the first pass); real GPT-2 found them after
billions of tokens. So the circuit is written into the initial weights, as GPT-2 has it, and
pretraining then trains every weight, circuit included.

The residual stream at init is split in three parts (n_embd = 2 * n_freq + head_dim + token dims):
    POS   sinusoid pairs of the position (wpe only)                        dims [0, 2 * n_freq)
    PREV  slot where layer 0 writes the previous token's identity          next head_dim dims
    TOK   the token embedding (wte only)                                   the rest
Layer 0, head 0 (previous-token head): its query is the position rotated back one step, its key
the position, so position t attends to t - 1; its value is a projection A of the token (head_dim
of the TOK dims), written into PREV.
Layer 1, heads 0..k (induction heads): query A(token at t), key PREV at s, so t attends where the
previous token equals its own token; values copy that position's TOK dims (an orthonormal
basis split over the heads) back into TOK, so the tied output layer predicts that token.
Every other weight keeps GPT-2's random init. LayerNorm is taken as a rescaling by
sqrt(n_embd) / |x| (|wte row| = |wpe row| = embedding_norm at init).
"""
import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel

MATCH_SCORE = 14.0   # attention logit of the matching key before softmax (others near 0)
COPY_GAIN = 4.0      # how far the copied token outweighs the rest of the residual


def side_lobe(frequencies, positions):
    """Largest sum of cos(w * d) over offsets d = 1..positions: how well a wrong offset scores."""
    offsets = torch.arange(1, positions + 1, dtype=torch.float64)
    return torch.cos(frequencies[:, None].double() * offsets[None]).sum(0).max().item()


def pick_frequencies(n_freq, positions, generator, tries=300):
    """n_freq angular frequencies, a third low (log-uniform in [0.003, 0.5]) to tell far
    positions apart, the rest in (0.05, pi) for a sharp peak; the draw whose side lobe is lowest."""
    best = None
    for _ in range(tries):
        w = torch.rand(n_freq, generator=generator) * (math.pi - 0.05) + 0.05
        low = n_freq // 3
        w[:low] = 0.003 * torch.exp(torch.rand(low, generator=generator) * math.log(0.5 / 0.003))
        lobe = side_lobe(w, positions)
        if best is None or lobe < best[0]:
            best = (lobe, w)
    return best[1]


def orthonormal_rows(rows, cols, generator):
    """(rows, cols) with orthonormal rows (rows <= cols)."""
    q, _ = torch.linalg.qr(torch.randn(cols, rows, generator=generator))
    return q.T


def set_head(attn, head, n_embd, head_dim, query=None, key=None, value=None, out=None):
    """Write one head's slices of GPT-2's fused c_attn (Conv1D: x @ W, columns q | k | v) and of
    c_proj (rows = the head's output dims). Each argument is (rows of the residual, matrix)."""
    weight, bias = attn.c_attn.weight, attn.c_attn.bias
    for part, given in enumerate((query, key, value)):
        cols = slice(part * n_embd + head * head_dim, part * n_embd + (head + 1) * head_dim)
        weight[:, cols] = 0
        bias[cols] = 0
        if given is not None:
            rows, matrix = given
            weight[rows, cols.start:cols.start + matrix.shape[1]] = matrix
    proj = attn.c_proj.weight
    proj[head * head_dim:(head + 1) * head_dim, :] = 0
    if out is not None:
        cols, matrix = out
        proj[head * head_dim:head * head_dim + matrix.shape[0], cols] = matrix


def induction_gpt2(n_layer=4, n_embd=128, n_head=4, n_positions=1024, vocab_size=50257, n_freq=12,
                   embedding_norm=2.0, seed=0):
    """A GPT2LMHeadModel (tied embeddings, dropout 0) that copies from its context at init."""
    head_dim = n_embd // n_head
    tok_dims = n_embd - 2 * n_freq - head_dim
    if n_layer < 2 or n_head < 2 or tok_dims < head_dim:
        raise ValueError(f"an induction init needs 2+ layers, 2+ heads and n_embd >= 2 * n_freq + "
                         f"2 * head_dim (got {n_layer} layers, {n_head} heads, n_embd {n_embd})")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                        vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    pos = list(range(2 * n_freq))
    prev = list(range(2 * n_freq, 2 * n_freq + head_dim))
    tok = list(range(2 * n_freq + head_dim, n_embd))
    ln_scale = math.sqrt(n_embd) / (math.sqrt(2) * embedding_norm)   # LayerNorm's gain on e + p
    w = pick_frequencies(n_freq, n_positions, generator)
    body = model.transformer
    with torch.no_grad():
        wte = torch.zeros_like(body.wte.weight)                                   # (V, n_embd)
        scale = embedding_norm / math.sqrt(tok_dims)
        wte[:, tok] = torch.randn(vocab_size, tok_dims, generator=generator) * scale
        body.wte.weight.copy_(wte)
        t = torch.arange(n_positions, dtype=torch.float32)[:, None]
        amplitude = embedding_norm / math.sqrt(n_freq)                             # |p| = |e|
        wpe = torch.zeros_like(body.wpe.weight)                                   # (positions, n_embd)
        wpe[:, 0:2 * n_freq:2] = amplitude * torch.cos(w[None] * t)
        wpe[:, 1:2 * n_freq:2] = amplitude * torch.sin(w[None] * t)
        body.wpe.weight.copy_(wpe)

        # layer 0, head 0: previous-token head
        pair = amplitude * ln_scale                                               # a pair's length after ln_1
        gain = MATCH_SCORE * math.sqrt(head_dim) / (n_freq * pair * pair)
        rotate = torch.zeros(2 * n_freq, 2 * n_freq)                              # q = R(-w) p
        for i in range(n_freq):
            c, s = math.cos(w[i]), math.sin(w[i])
            rotate[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor([[c, -s], [s, c]]) * gain
        project = orthonormal_rows(head_dim, tok_dims, generator)                 # A: (head_dim, tok)
        set_head(body.h[0].attn, 0, n_embd, head_dim, query=(pos, rotate), key=(pos, torch.eye(2 * n_freq)),
                 value=(tok, project.T), out=(prev, torch.eye(head_dim) / ln_scale))

        # layer 1, heads 0..k: induction heads sharing one query/key, each copying a block of TOK
        basis = orthonormal_rows(tok_dims, tok_dims, generator)                   # (tok, tok)
        # A e_t . A e_s after both LayerNorms is about |e|^2 ln_scale^2 head_dim / tok_dims when t = s
        match = (MATCH_SCORE * math.sqrt(head_dim) * tok_dims
                 / (ln_scale ** 2 * embedding_norm ** 2 * head_dim))
        copy_heads = min(n_head, math.ceil(tok_dims / head_dim))
        for head in range(copy_heads):
            block = basis[head * head_dim:(head + 1) * head_dim]                  # (<= head_dim, tok)
            set_head(body.h[1].attn, head, n_embd, head_dim, query=(tok, project.T * match),
                     key=(prev, torch.eye(head_dim)), value=(tok, block.T),
                     out=(tok, block * COPY_GAIN / ln_scale))
    model.tie_weights()
    return model
