#!/usr/bin/env python
"""Multi-task training of the Versatile Language Model on several tasks' data at once: by default
every task's residual adapters and task embeddings on one frozen GPT-2 (one multi-task adapter
checkpoint); with --no_adapter, full fine-tuning of GPT-2 on the mixed data (a full checkpoint,
decoded with task id -1 since it has no adapters).

    python train_vlm.py --gradient_accumulation_steps=16 --train_batch_size=1 --valid_batch_size=1 \
        --n_epochs 3
    python train_vlm.py --tasks mt nlg --dataset_paths mt=data/NMT/data_en_ge.json nlg=data/NLG/data.json
    python train_vlm.py --tasks mt nlg qa --method lora nlg=prefix+ln qa=adapter --lora_r 4
    python train_vlm.py --tasks mt nlg --method poly --poly_splits 8   (Polytropon / MHR, saved as lora)
    torchrun --nproc_per_node 2 train_vlm.py ...             (distributed data parallel)

Each epoch draws from task t a share proportional to n_t^(1/T) of all training examples
(--temperature T; 1 = every example once, larger = closer to uniform over tasks). Batches mix
tasks (--mix_tasks, the default) or hold one task each (--no-mix_tasks). Validation reports the
token-level NLL and perplexity of every task after each epoch (metrics.jsonl).

--method gives every task, or each task (TASK=METHOD), any per-task method of train.py; tasks of
different methods share batches and one forward pass, and each row's gradient reaches only its own
task. Epoch checkpoints hold the training state: the same command with --resume continues a killed
run and ends with the same weights."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engines.cli import common_training_arguments  # noqa: E402
from engines.multitask import run_multitask  # noqa: E402
from engines.runtime import configure_logging  # noqa: E402
from engines.settings import DEFAULTS  # noqa: E402
from tasks.table import TASKS  # noqa: E402
from utils.errors import ArgumentParser, exit_on_user_error  # noqa: E402
from utils.hub import check_model_source  # noqa: E402


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common_training_arguments(parser)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="TASK",
                        help=f"tasks trained together ({', '.join(TASKS)}, and tasks of --task_file)")
    parser.add_argument("--dataset_paths", nargs="+", default=[], metavar="TASK=PATH",
                        help="dataset JSON per task (a user task: its folder of train/valid/test.jsonl); "
                             "a built-in task not named here reads its path from the authors' run.sh")
    parser.add_argument("--no_adapter", action="store_true",
                        help="full fine-tuning of GPT-2 on all tasks, no adapters "
                             "(default: adapters, frozen GPT-2)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="task sampling temperature: p_t ~ n_t^(1/T); 1 = proportional, inf = uniform")
    parser.add_argument("--mix_tasks", action=argparse.BooleanOptionalAction, default=True,
                        help="batches mix tasks (--no-mix_tasks: every batch holds one task)")
    parser.add_argument("--max_history", type=int, default=None,
                        help="previous exchanges kept for dialogue and qa (None: each task's own, 2 and 1)")
    parser.add_argument("--train_batch_size", type=int, default=DEFAULTS["train_batch_size"],
                        help="batch size for training")
    parser.add_argument("--valid_batch_size", type=int, default=DEFAULTS["valid_batch_size"],
                        help="batch size for validation")
    parser.add_argument("--gradient_accumulation_steps", type=int,
                        default=DEFAULTS["gradient_accumulation_steps"],
                        help="batches accumulated per optimizer step")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate, falling linearly to 0 "
                             "(None: 5e-4; 6.25e-5 with --no_adapter)")
    parser.add_argument("--n_epochs", type=int, default=DEFAULTS["n_epochs"], help="training epochs")
    parser.add_argument("--output_dir", type=str, default=None,
                        help="run folder (None: "
                             "runs/<date>_VLM_multitask_<adapter|full>_<model>_T<T>_lr<lr>_ep<n>)")
    parser.add_argument("--seed", type=int, default=42, help="seed of python, torch and the task sampler")
    from engines.method_flags import add_method_arguments
    from engines.poly import add_poly_arguments
    add_method_arguments(parser, per_task=True)
    add_poly_arguments(parser)
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    check_model_source(args.model_checkpoint)  # a hub name the hub cannot serve fails now, not after the data
    configure_logging()
    run_multitask(args)


if __name__ == "__main__":
    main()
