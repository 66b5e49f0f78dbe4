"""Write a small GPT-2 with random weights (built from a config, no download) plus the GPT-2
tokenizer to a folder, to use as --model_checkpoint for demos and smoke runs.

    python -m models.tiny_gpt2 runs/tiny-gpt2 [--n_layer 2 --n_embd 128 --n_head 4 --seed 0]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from utils.data import load_tokenizer  # noqa: E402
from utils.errors import ArgumentParser, exit_on_user_error  # noqa: E402


def build(n_layer=2, n_embd=128, n_head=4, n_positions=1024, seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions))


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(description="Write a small random GPT-2 to a folder.")
    parser.add_argument("output_dir")
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_positions", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = build(args.n_layer, args.n_embd, args.n_head, args.n_positions, args.seed)
    hf_logging.disable_progress_bar()  # a one-file model needs no "Writing model shards" bar
    model.save_pretrained(args.output_dir)
    load_tokenizer().save_pretrained(args.output_dir)
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote a random GPT-2 ({args.n_layer} layers, {args.n_embd} wide, {count:,} parameters) to "
          f"{args.output_dir}")


if __name__ == "__main__":
    main()
