"""Can a GPT-2 read its own context? The repeated-random-sequence test (induction heads).

A sequence of random tokens is unpredictable the first time; shown a second time straight after,
a model that can look back and copy predicts it almost perfectly. GPT-2 small gives a repeat a
loss near 0.1 nats; a model without induction heads gives the repeat the same loss as the first
pass (~ln(50,257) = 10.8 nats for random ids). A frozen backbone that fails this cannot learn,
through a small per-task module, to carry a name from its input into its output.

    python -m models.copy_test --model_checkpoint data/gpt2-stand-in     (any GPT-2 folder or hub name)

prints one JSON object: mean NLL of the first pass and of the repeat, in nats per token.
"""
import argparse
import json
import sys

import torch

GPT2_TEXT_TOKENS = 50256  # ids 0..50255 are text; 50256 is <|endoftext|>
DEFAULT_SEQUENCES, DEFAULT_LENGTH, DEFAULT_SEED = 16, 50, 0


def random_sequences(count=DEFAULT_SEQUENCES, length=DEFAULT_LENGTH, seed=DEFAULT_SEED,
                     vocab=GPT2_TEXT_TOKENS):
    """(count, length) token ids drawn uniformly from GPT-2's text tokens, from their own seeded
    generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=generator)


@torch.no_grad()
def copy_losses(gpt2, count=DEFAULT_SEQUENCES, length=DEFAULT_LENGTH, seed=DEFAULT_SEED):
    """{"first": mean NLL of tokens 2..L of each sequence, "repeat": mean NLL of the L tokens of
    its second showing} for a GPT2LMHeadModel; the model's mode is restored afterwards."""
    sequences = random_sequences(count, length, seed)                      # (n, L)
    device = next(gpt2.parameters()).device
    blocks = torch.cat([sequences, sequences], dim=1).to(device)           # (n, 2L)
    was_training = gpt2.training
    gpt2.eval()
    try:
        logits = gpt2(blocks, use_cache=False).logits.float()              # (n, 2L, V)
    finally:
        gpt2.train(was_training)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), blocks[:, 1:],
                                            reduction="none")              # (n, 2L-1): nll[:, i] predicts i+1
    first = nll[:, :length - 1]            # tokens 2..L: token 1 has no context at all
    repeat = nll[:, length - 1:]           # the L tokens of the second showing
    return {"first": first.mean().item(), "repeat": repeat.mean().item(), "sequences": count,
            "length": length}


def main(argv=None):
    parser = argparse.ArgumentParser(description="The repeated-random-sequence test of a GPT-2 (copying from "
                                                 "context): mean NLL of the first pass and of the repeat.")
    parser.add_argument("--model_checkpoint", required=True, help="GPT-2 folder or hub name")
    parser.add_argument("--sequences", type=int, default=DEFAULT_SEQUENCES)
    parser.add_argument("--length", type=int, default=DEFAULT_LENGTH,
                        help="tokens per sequence (shown twice)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for name in ("sequences", "length"):
        if getattr(args, name) < 2:
            print(f"error: --{name} must be at least 2, got {getattr(args, name)}", file=sys.stderr)
            return 2
    from transformers import GPT2LMHeadModel
    try:
        gpt2 = GPT2LMHeadModel.from_pretrained(args.model_checkpoint).to(args.device)
    except (OSError, ValueError) as error:
        print(f"error: --model_checkpoint {args.model_checkpoint}: cannot load a GPT-2 model ({error})",
              file=sys.stderr)
        return 2
    if 2 * args.length > gpt2.config.n_positions:
        print(f"error: --length {args.length}: "
              f"twice it exceeds the model's {gpt2.config.n_positions} positions",
              file=sys.stderr)
        return 2
    result = copy_losses(gpt2, args.sequences, args.length, args.seed)
    result["model_checkpoint"] = args.model_checkpoint
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
