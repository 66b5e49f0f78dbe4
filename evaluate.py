"""Evaluate a single-task checkpoint: decode a dataset split, print and write the task's metrics.

    python evaluate.py --task mt --no_sample --model_checkpoint runs/<checkpoint>
    python evaluate.py --task nlg --no_sample --model_checkpoint runs/<checkpoint> \
        --input "name[The Vaults], eatType[pub]"
    python evaluate.py --task sentiment --task_file data/tasks/nemo_article.json \
        --dataset_path data/samples/sentiment \
        --no_sample --model_checkpoint runs/<p-tuned checkpoint>
        (a user task; its template is also in the checkpoint)
    python evaluate.py --task sentiment --task_file ... --model_checkpoint data/gpt2-stand-in --shots 4
        (4-shot prompting)
    echo '{"src": "a man is sleeping ."}' | python evaluate.py --task mt --no_sample \
        --model_checkpoint runs/<ckpt> --input -
"""
import logging
import sys

from engines.cli import (
    check_decoding_arguments,
    checkpoint_config,
    checkpoint_entry,
    decode_user_input,
    decoding_arguments,
    known_user_tasks,
)
from engines.evaluation import evaluate_task, format_metrics
from models.checkpoint import load_checkpoint
from tasks.table import get_task
from utils.errors import ArgumentParser, VLMError, exit_on_user_error


@exit_on_user_error
def main(argv=None):
    parser = decoding_arguments(ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--task", type=str, default="dialogue",
                        help="mt, summarization, dialogue, qa or nlg, "
                             "or a user task (of --task_file or the checkpoint)")
    parser.add_argument("--shots", type=int, default=0,
                        help="user tasks: put k solved training examples in front of every prompt "
                             "(few-shot prompting)")
    parser.add_argument("--adapter_bottleneck", type=int, default=0,
                        help="accepted for compatibility; the bottleneck is read from the checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.shots < 0:
        raise VLMError(f"--shots must be 0 or more, got {args.shots}")
    config = checkpoint_config(args.model_checkpoint) if args.model_checkpoint else None
    task = get_task(args.task, known_user_tasks(args, config))
    options = check_decoding_arguments(args)
    dataset_path = args.dataset_path or task.default_dataset

    model, tokenizer, config = load_checkpoint(args.model_checkpoint, args.device)
    entry = checkpoint_entry(config, task.name, args.model_checkpoint)
    stored = entry.get("bottleneck", 0)
    if args.adapter_bottleneck and args.adapter_bottleneck != stored:
        methods = "+".join(entry.get("methods", {})) or "none"
        kept = (f"the checkpoint's is {stored}" if stored
                else f"in the checkpoint, {task.name}'s modules are {methods}")
        print(f"note: --adapter_bottleneck {args.adapter_bottleneck} ignored; {kept}",
              file=sys.stderr)
    task_id = model.task_id(task.name)

    if args.input is not None:
        decode_user_input(model, tokenizer, task, args, options, task_id)
        return
    task.check_dataset_path(dataset_path)
    output_dir = args.output_dir or ("results/adapter_result" if config["mode"] == "adapter"
                                     else "results/GPT2_result")
    result = evaluate_task(model, tokenizer, task, dataset_path, options, task_id,
                           max_history=args.max_history, batch_size=args.batch_size, output_dir=output_dir,
                           dataset_cache=args.dataset_cache, cleanup=not args.raw_text, shots=args.shots)
    print(format_metrics(result))
    print(f"outputs, references and {task.name}_metrics.json written to {output_dir}")


if __name__ == "__main__":
    main()
