#!/usr/bin/env python
"""Pretrain a GPT-2 language model on plain-text files, or continue pretraining one (domain
adaptation), with GPT-2's tokenizer; the result is a Hugging Face GPT-2 folder that every other
script loads with --model_checkpoint.

    python pretrain.py --train_files wiki.txt.xz books.txt:2 --valid_files valid_en.txt.xz \\
        --n_layer 4 --n_embd 128 --n_head 4 --max_steps 2000 --output_dir runs/my-gpt2
    python pretrain.py --model_checkpoint gpt2 --train_files my_domain.txt ...   (continued pretraining)
    torchrun --nproc_per_node 2 pretrain.py ...                                 (data parallel)
    python pretrain.py ... --output_dir runs/my-gpt2 --resume                    (after a crash)

Text files are .txt or .txt.xz, UTF-8, read as a stream (memory stays bounded); `PATH:WEIGHT` sets
a file's share of the mix (default: its size on disk). Every --eval_interval steps the run
reports validation perplexity on each --valid_files file, appends to metrics.jsonl, writes
TensorBoard scalars and an atomic checkpoint that --resume continues from exactly."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from utils.errors import ArgumentParser, exit_on_user_error  # noqa: E402


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train_files", nargs="+", required=True, metavar="PATH[:WEIGHT]",
                      help="training text (.txt or .txt.xz)")
    data.add_argument("--valid_files", nargs="+", required=True, metavar="PATH", help="held-out text files")
    data.add_argument("--block_size", type=int, default=512,
                      help="tokens per training block (at most n_positions)")
    data.add_argument("--valid_tokens", type=int, default=131072,
                      help="tokens of each validation file evaluated")
    data.add_argument("--shuffle_blocks", type=int, default=512, help="blocks in the shuffle buffer")
    data.add_argument("--blank_line_documents", nargs="+", default=[], metavar="PATH",
                      help="training files in which a blank line ends a document: "
                           "<|endoftext|> goes between their documents (other files' text runs on)")
    data.add_argument("--copy_fraction", type=float, default=0.0,
                      help="share of training blocks made of repeated spans "
                           "(synthetic: span, gap, span again), "
                           "which teach a small model to copy from its context")
    data.add_argument("--copy_random_share", type=float, default=0.5,
                      help="share of those spans drawn as random token ids (the rest: natural text)")
    model = parser.add_argument_group("model (random init from a config unless --model_checkpoint)")
    model.add_argument("--model_checkpoint", default=None,
                       help="GPT-2 folder or hub name to continue pretraining")
    model.add_argument("--init", choices=("random", "induction"), default="random",
                       help="a fresh model's weights: GPT-2's random init, or that plus an induction "
                            "circuit set by hand in layers 0-1 (models/induction_init.py), which a small "
                            "model on a CPU budget does not find by itself; pretraining trains it")
    model.add_argument("--n_layer", type=int, default=4)
    model.add_argument("--n_embd", type=int, default=128)
    model.add_argument("--n_head", type=int, default=4)
    model.add_argument("--n_positions", type=int, default=1024)
    train = parser.add_argument_group("training")
    train.add_argument("--batch_size", type=int, default=8, help="blocks per micro-batch and process")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--max_steps", type=int, default=1000, help="optimizer steps")
    train.add_argument("--warmup_steps", type=int, default=100)
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    train.add_argument("--min_lr", type=float, default=1e-4, help="learning rate at the end of the decay")
    train.add_argument("--schedule", choices=("cosine", "linear"), default="cosine",
                       help="decay after warmup")
    train.add_argument("--weight_decay", type=float, default=0.1)
    train.add_argument("--beta1", type=float, default=0.9)
    train.add_argument("--beta2", type=float, default=0.95)
    train.add_argument("--max_norm", type=float, default=1.0, help="gradient clipping norm")
    train.add_argument("--dropout", type=float, default=0.0,
                       help="dropout during this run (the saved config keeps its own)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    train.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="autocast dtype (bfloat16 on CUDA; float16 adds gradient scaling)")
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", required=True, help="run folder; the final model is written into it")
    out.add_argument("--eval_interval", type=int, default=100,
                     help="optimizer steps between validations and checkpoints")
    out.add_argument("--log_every", type=float, default=30.0, help="seconds between progress lines")
    out.add_argument("--save_dtype", choices=("float32", "float16"), default="float32",
                     help="dtype of the saved weights")
    out.add_argument("--resume", action="store_true",
                     help="continue the run in --output_dir from its checkpoint")
    return parser


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    from engines.pretrain import run_pretraining
    from engines.runtime import configure_logging
    configure_logging()
    run_pretraining(args)


if __name__ == "__main__":
    main()
