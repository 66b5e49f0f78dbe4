"""models/output_ceiling.py: the lowest NLL any last hidden state gives a token under a frozen
final LayerNorm and output layer, checked against values worked out by hand."""
import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from models.output_ceiling import output_ceiling

D, V, NORM = 16, 50, 3.0
CONFIG = GPT2Config(vocab_size=V, n_embd=D, n_layer=1, n_head=2, n_positions=8, bos_token_id=0,
                    eos_token_id=0)


def hand_built_model():
    """ln_f with gains g in [0.5, 1.5] and no bias; output rows all zero but rows 3 and 7, which
    are one mean-zero vector u of norm 3 (tied, so the input rows are the same)."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(CONFIG)
    u = torch.randn(D)
    u = (u - u.mean()) / (u - u.mean()).norm() * NORM
    with torch.no_grad():
        gpt2.transformer.ln_f.weight.copy_(0.5 + torch.rand(D))
        gpt2.transformer.ln_f.bias.zero_()
        gpt2.transformer.wte.weight.zero_()
        gpt2.transformer.wte.weight[3] = u
        gpt2.transformer.wte.weight[7] = u
    return gpt2


def test_ceilings_equal_the_values_worked_out_by_hand():
    gpt2 = hand_built_model()
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    # The logit of row u is x . (g * u) for a LayerNorm output x: mean zero, norm sqrt(D). So the
    # largest is s = sqrt(D) |g * u - mean(g * u)|, at x along that vector, not along u where the
    # search starts; rows 3 and 7 always get the same logit: token 3 never passes probability 1/2.
    g, u = gpt2.transformer.ln_f.weight.detach(), gpt2.transformer.wte.weight.detach()[3]
    s = math.sqrt(D) * (g * u - (g * u).mean()).norm().item()
    start = (g * u / u.std(unbiased=False) * u).sum().item()         # the logit at h = u
    assert s > start + 0.5                                            # so the search has to move
    twin = math.log(2 * math.exp(s) + (V - 2)) - s                   # 0.69397: just above ln 2
    zero_row = math.log(2 * math.exp(-s) + (V - 2))                   # a zero row's logit is always 0
    alone = math.log(math.exp(s) + 4) - s                             # vocab=5: row 7 is out of the softmax
    found_twin, found_zero = output_ceiling(gpt2, [3, 0])
    assert twin - 1e-6 <= found_twin <= twin + 1e-5                   # reached, and never below the optimum
    assert zero_row - 1e-6 <= found_zero <= zero_row + 1e-5  # 3.912 where the search starts
    assert abs(output_ceiling(gpt2, [3], vocab=5)[0] - alone) < 1e-4
    assert all(torch.equal(before[k], v) for k, v in gpt2.state_dict().items())  # the model is not changed


def test_tokens_are_searched_independently_and_in_chunks():
    gpt2 = GPT2LMHeadModel(CONFIG)
    ids = [5, 1, 30, 5, 44]
    together = output_ceiling(gpt2, ids, chunk=2)
    apart = [output_ceiling(gpt2, [i])[0] for i in ids]
    assert max(abs(a - b) for a, b in zip(together, apart)) < 1e-4   # one h per token, whatever the batch
    assert together[0] == together[3]
    # a random model's rows are short: no token gets far from the uniform NLL ln V
    assert all(0 < nll < math.log(V) for nll in together)
