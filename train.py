#!/usr/bin/env python
"""Train one task of the Versatile Language Model: full fine-tuning of GPT-2 or, with
--adapter_bottleneck B, only the task's residual adapters and task embeddings on a frozen GPT-2;
--method NAME trains any other per-task method (lora, prefix, prompt, ptuning, ln, ...) instead.

    python train.py --task nlg --adapter_bottleneck 10 --dataset_path data/NLG/data.json
    python train.py --task nlg --method lora --lora_r 8 --lora_targets q,v
    python train.py --task qa --method poly --poly_inventory runs/POLY_RUN   (routed over its skills)
    torchrun --nproc_per_node 2 train.py --task mt ...       (distributed data parallel)

Flags left out take the task table's values (tasks/table.py: the authors' run.sh). The output
folder holds the final model (load it with evaluate.py --model_checkpoint <output_dir>), the last
three checkpoint_epoch<N>/ folders, metrics.jsonl and training_args.json. Each checkpoint also holds
the training state (training_state.safetensors + training_state.json): after a crash, the same
command with --resume continues from the last complete checkpoint and ends with the same weights."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from utils.errors import ArgumentParser, exit_on_user_error  # noqa: E402


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from engines.cli import common_training_arguments
    common_training_arguments(parser)
    parser.add_argument("--dataset_path", type=str, default=None,
                        help="dataset JSON (default: the task's path from the authors' run.sh); "
                             "for a user task, its folder of train/valid/test.jsonl")
    parser.add_argument("--task", type=str, default="dialogue",
                        help="dialogue, qa, mt, summarization or nlg, or a task of --task_file")
    parser.add_argument("--max_history", type=int, default=None,
                        help="previous exchanges kept (dialogue, qa)")
    parser.add_argument("--train_batch_size", type=int, default=None, help="batch size for training")
    parser.add_argument("--valid_batch_size", type=int, default=None,
                        help="batch size for validation (default: the training batch size)")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=None,
                        help="batches accumulated per optimizer step")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (falls linearly to 0)")
    parser.add_argument("--n_epochs", type=int, default=None, help="training epochs")
    parser.add_argument("--adapter_bottleneck", type=int, default=0,
                        help="adapter bottleneck size; 0: full fine-tuning")
    parser.add_argument("--emb_only", action="store_true",
                        help="train only the task's special-token embeddings")
    parser.add_argument("--outputlayer_only", action="store_true",
                        help="train only the (tied) embedding / output layer")
    parser.add_argument("--random_init", action="store_true", help="start GPT-2 from random weights")
    parser.add_argument("--distillation", action="store_true", help="train on the distilled targets")
    parser.add_argument("--output_dir", type=str, default=None,
                        help="run folder (default: runs/<date>_<model>_<task>_<mode>_lr<lr>_ep<n>)")
    parser.add_argument("--seed", type=int, default=42, help="seed of python and torch")
    from engines.method_flags import add_method_arguments
    from engines.poly import add_poly_arguments
    add_method_arguments(parser)
    add_poly_arguments(parser)
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    from utils.hub import check_model_source
    check_model_source(args.model_checkpoint)  # a hub name the hub cannot serve fails now, not after the data
    from engines.runtime import configure_logging
    from engines.training import run_training
    configure_logging()
    run_training(args)


if __name__ == "__main__":
    main()
