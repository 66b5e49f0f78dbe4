#!/usr/bin/env python
"""Sentence-level knowledge distillation: a teacher checkpoint decodes every training input and
writes the outputs as the targets of `train.py --distillation`.

    python sentence_distiller.py --task mt --max_history=2 \
        --model_checkpoint runs/<fully fine-tuned checkpoint> --no_sample
    python train.py --task mt --adapter_bottleneck 300 --distillation
        (finds data/NMT/data_en_ge.distilled.json)

The dataset file is never changed: the distilled copy goes to --output (default: beside the
dataset, `<dataset stem>.distilled.json`). Train records get `distillated_tgt` (mt,
summarization, nlg) or, per utterance, `distillated_candidates` (dialogue, qa); the other splits
are copied unchanged. An interrupted run continues from `<output>.partial.jsonl` when rerun
with the same arguments."""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engines.cli import (  # noqa: E402
    check_decoding_arguments,
    checkpoint_config,
    checkpoint_entry,
    decoding_arguments,
    known_user_tasks,
)
from engines.distill import distill  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from tasks.table import get_task  # noqa: E402
from utils.errors import ArgumentParser, VLMError, exit_on_user_error  # noqa: E402


def build_parser():
    parser = decoding_arguments(ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--task", type=str, default="dialogue",
                        help="mt, summarization, dialogue, qa or nlg, "
                             "or a user task (of --task_file or the teacher)")
    parser.add_argument("--output", type=str, default=None,
                        help="distilled dataset to write "
                             "(default: <dataset stem>.distilled.json beside the dataset)")
    parser.add_argument("--adapter_bottleneck", type=int, default=0,
                        help="accepted for compatibility; the bottleneck is read from the checkpoint")
    return parser


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    task = get_task(args.task, known_user_tasks(args, checkpoint_config(args.model_checkpoint)
                                                if args.model_checkpoint else None))
    # Flags shared with evaluate.py that mean nothing here: refuse them rather than ignore them.
    for flag in ("input", "output_dir"):
        if getattr(args, flag) is not None:
            raise VLMError(f"--{flag}: not used by sentence_distiller.py "
                           "(the distilled dataset goes to --output)")
    options = check_decoding_arguments(args)
    dataset_path = args.dataset_path or task.default_dataset
    output = args.output or task.distilled_path(dataset_path)
    max_history = task.max_history if args.max_history is None else args.max_history
    if max_history < 0:
        raise VLMError(f"--max_history must be 0 or more, got {max_history}")
    task.check_distill_output(dataset_path, output)  # before the teacher loads: cheap mistakes first
    if not os.path.isdir(args.model_checkpoint):
        raise VLMError(f"--model_checkpoint {args.model_checkpoint}: teacher checkpoint folder not found")

    model, tokenizer, config = load_checkpoint(args.model_checkpoint, args.device)
    checkpoint_entry(config, task.name, args.model_checkpoint)
    task_id = model.task_id(task.name)
    if not args.no_sample:
        print("note: sampling the distilled targets; the authors distilled with --no_sample (greedy)",
              file=sys.stderr)

    total, decoded = distill(model, tokenizer, task, dataset_path, output, options, task_id, max_history,
                             args.model_checkpoint, batch_size=args.batch_size,
                             dataset_cache=args.dataset_cache)
    print(f"{total} training examples distilled ({decoded} decoded in this run) -> {output}")
    print(f"train on them with: python train.py --task {task.name}{task.command_flags(args.task_file)} "
          f"--distillation --dataset_path {dataset_path}")


if __name__ == "__main__":
    main()
