"""Evaluate a single-task checkpoint: decode a dataset split, print and write the task's metrics.

    python evaluate.py --task mt --no_sample --model_checkpoint runs/<checkpoint>
    python evaluate.py --task nlg --no_sample --model_checkpoint runs/<checkpoint> --input "name[The Vaults], eatType[pub]"
    python evaluate.py --task sentiment --task_file data/tasks/nemo_article.json --dataset_path data/samples/sentiment \
        --no_sample --model_checkpoint runs/<p-tuned checkpoint>          (a user task; its template is also in the checkpoint)
    python evaluate.py --task sentiment --task_file ... --model_checkpoint data/gpt2-stand-in --shots 4   (4-shot prompting)
    echo '{"src": "a man is sleeping ."}' | python evaluate.py --task mt --no_sample --model_checkpoint runs/<ckpt> --input -
"""
import dataclasses
import json
import logging
import os
import random
import sys

import torch

from models.checkpoint import load_checkpoint
from utils.errors import ArgumentParser, VLMError, exit_on_user_error
from engines.evaluation import evaluate_task, format_metrics, task_output, user_prompt
from engines.generate import DecodingOptions, generate
from utils.tasks import get_task


def decoding_arguments(parser):
    """Flags shared by evaluate.py and evaluate_vlm.py (the authors' names and defaults)."""
    parser.add_argument("--model_checkpoint", type=str, default="", help="checkpoint folder (or a GPT-2 name/folder)")
    parser.add_argument("--model", type=str, default="gpt2", help="model type; only gpt2 (kept for compatibility)")
    parser.add_argument("--dataset_path", type=str, default="",
                        help="dataset JSON (default: the task's path); a user task's folder of train/valid/test.jsonl")
    parser.add_argument("--task_file", type=str, default=None,
                        help="JSON task file of user tasks (default: the templates the checkpoint records)")
    parser.add_argument("--dataset_cache", type=str, default="./dataset_cache", help="prefix of the tokenization cache")
    parser.add_argument("--max_history", type=int, default=None, help="previous turns kept (default: the task's)")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no_sample", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--max_length", type=int, default=150, help="maximum length of an output")
    parser.add_argument("--min_length", type=int, default=1, help="minimum length of an output")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling softmax temperature")
    parser.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (<=0: off)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus filtering (<=0.0: off)")
    parser.add_argument("--batch_size", type=int, default=32, help="prompts decoded together")
    parser.add_argument("--output_dir", type=str, default=None, help="where outputs and metrics go")
    parser.add_argument("--raw_text", action="store_true",
                        help="keep decoded text as is (default: the space clean-up of the authors' tokenizer)")
    parser.add_argument("--input", type=str, default=None,
                        help="decode your own input instead of a dataset: text, or - for JSON lines on stdin")
    return parser


def known_user_tasks(args, config=None):
    """User tasks by name: the checkpoint's recorded templates, then --task_file's (which win)."""
    from models.checkpoint import CONFIG_NAME
    from utils.task_file import load_task_file, recorded_user_tasks
    tasks = dict(recorded_user_tasks(config, os.path.join(args.model_checkpoint, CONFIG_NAME))) if config else {}
    if args.task_file:
        for name, task in load_task_file(args.task_file).items():
            recorded = tasks.get(name)
            tasks[name] = task if recorded is None else dataclasses.replace(task, task_id=recorded.task_id)
    return tasks


def checkpoint_config(path):
    """The vlm_config.json of a checkpoint folder, or None (a plain GPT-2 folder or hub name)."""
    from models.checkpoint import CONFIG_NAME, read_config
    return read_config(path) if os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME)) else None


def check_decoding_arguments(args):
    if args.model != "gpt2":
        raise VLMError(f"--model {args.model}: only gpt2 is supported")
    if not args.model_checkpoint:
        raise VLMError("--model_checkpoint is required (a checkpoint folder written by train.py)")
    for flag in ("max_length", "batch_size"):
        if getattr(args, flag) < 1:
            raise VLMError(f"--{flag} must be at least 1")
    if args.min_length < 0 or args.min_length > args.max_length:
        raise VLMError("--min_length must be between 0 and --max_length")
    if not args.no_sample and args.temperature <= 0:
        raise VLMError("--temperature must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise VLMError(f"--device {args.device}: CUDA is not available on this machine")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    return DecodingOptions(max_length=args.max_length, min_length=args.min_length, no_sample=args.no_sample,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def read_user_items(text):
    """Items from --input: the text itself, or JSON lines (or plain lines) from stdin."""
    if text != "-":
        return [(text, "--input")]
    items = []
    for number, line in enumerate(sys.stdin, 1):
        line = line.strip()
        if not line:
            continue
        try:
            item = json.loads(line) if line[0] in "{[\"" else line
        except json.JSONDecodeError as error:
            raise VLMError(f"stdin line {number}: invalid JSON ({error.msg})") from None
        items.append((item, f"stdin line {number}"))
    if not items:
        raise VLMError("--input -: no input lines on stdin")
    return items


def decode_user_input(model, tokenizer, task, args, options, task_id):
    max_history = task.max_history if args.max_history is None else args.max_history
    items = read_user_items(args.input)
    prompts = [user_prompt(task, item, tokenizer, max_history, task_id, where) for item, where in items]
    outputs = generate(model, prompts, options, batch_size=args.batch_size, progress=False)
    for (item, _), ids in zip(items, outputs):
        text = task_output(task, tokenizer, ids, cleanup=not args.raw_text)
        print(json.dumps({"input": item, "output": text}, ensure_ascii=False) if args.input == "-" else text)


@exit_on_user_error
def main(argv=None):
    parser = decoding_arguments(ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--task", type=str, default="dialogue",
                        help="mt, summarization, dialogue, qa or nlg, or a user task (of --task_file or the checkpoint)")
    parser.add_argument("--shots", type=int, default=0,
                        help="user tasks: put k solved training examples in front of every prompt (few-shot prompting)")
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
    if task.layout == "template" and args.input is None:
        from engines.training import check_dataset_path
        check_dataset_path(task, dataset_path)

    model, tokenizer, config = load_checkpoint(args.model_checkpoint, args.device)
    tasks = config.get("tasks", {})
    if config["mode"] == "adapter" and task.name not in tasks:
        raise VLMError(f"{args.model_checkpoint}: checkpoint holds {', '.join(tasks)}, not {task.name}")
    entry = tasks.get(task.name, {})
    stored = entry.get("bottleneck", 0)
    if args.adapter_bottleneck and args.adapter_bottleneck != stored:
        methods = "+".join(entry.get("methods", {})) or "none"
        kept = f"the checkpoint's is {stored}" if stored else f"in the checkpoint, {task.name}'s modules are {methods}"
        print(f"note: --adapter_bottleneck {args.adapter_bottleneck} ignored; {kept}",
              file=sys.stderr)
    task_id = model.task_id(task.name)

    if args.input is not None:
        decode_user_input(model, tokenizer, task, args, options, task_id)
        return
    output_dir = args.output_dir or ("results/adapter_result" if config["mode"] == "adapter" else "results/GPT2_result")
    result = evaluate_task(model, tokenizer, task, dataset_path, options, task_id,
                           max_history=args.max_history, batch_size=args.batch_size, output_dir=output_dir,
                           dataset_cache=args.dataset_cache, cleanup=not args.raw_text, shots=args.shots)
    print(format_metrics(result))
    print(f"outputs, references and {task.name}_metrics.json written to {output_dir}")


if __name__ == "__main__":
    main()
