"""Command-line pieces the scripts share (a script never imports another script): the decoding
flags of evaluate.py, evaluate_vlm.py and sentence_distiller.py and their checks, the user tasks a
checkpoint and --task_file know, --input payloads, and the flags train.py and train_vlm.py share."""
import dataclasses
import json
import os
import random
import sys

import torch

from engines.generate import DecodingOptions, generate
from models.checkpoint import CONFIG_NAME, read_config
from tasks.task_file import load_task_file, recorded_user_tasks
from utils.errors import VLMError


def decoding_arguments(parser):
    """Flags shared by evaluate.py and evaluate_vlm.py (the authors' names and defaults)."""
    parser.add_argument("--model_checkpoint", type=str, default="",
                        help="checkpoint folder (or a GPT-2 name/folder)")
    parser.add_argument("--model", type=str, default="gpt2",
                        help="model type; only gpt2 (kept for compatibility)")
    parser.add_argument("--dataset_path", type=str, default="",
                        help="dataset JSON (default: the task's path); "
                             "a user task's folder of train/valid/test.jsonl")
    parser.add_argument("--task_file", type=str, default=None,
                        help="JSON task file of user tasks (default: the templates the checkpoint records)")
    parser.add_argument("--dataset_cache", type=str, default="./dataset_cache",
                        help="prefix of the tokenization cache")
    parser.add_argument("--max_history", type=int, default=None,
                        help="previous turns kept (default: the task's)")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no_sample", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--max_length", type=int, default=150, help="maximum length of an output")
    parser.add_argument("--min_length", type=int, default=1, help="minimum length of an output")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling softmax temperature")
    parser.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (<=0: off)")
    parser.add_argument("--top_p", type=float, default=0.9,
                        help="nucleus filtering: sample from the most likely tokens whose probabilities "
                             "add up to top_p, in (0, 1] (1: off)")
    parser.add_argument("--batch_size", type=int, default=32, help="prompts decoded together")
    parser.add_argument("--output_dir", type=str, default=None, help="where outputs and metrics go")
    parser.add_argument("--raw_text", action="store_true",
                        help="keep decoded text as is "
                             "(default: the space clean-up of the authors' tokenizer)")
    parser.add_argument("--input", type=str, default=None,
                        help="decode your own input instead of a dataset: text, or - for JSON lines on stdin")
    return parser


def known_user_tasks(args, config=None):
    """User tasks by name: the checkpoint's recorded templates, then --task_file's (which win)."""
    tasks = (dict(recorded_user_tasks(config, os.path.join(args.model_checkpoint, CONFIG_NAME)))
             if config else {})
    if args.task_file:
        for name, task in load_task_file(args.task_file).items():
            recorded = tasks.get(name)
            tasks[name] = task if recorded is None else dataclasses.replace(task, task_id=recorded.task_id)
    return tasks


def checkpoint_config(path):
    """The vlm_config.json of a checkpoint folder, or None (a plain GPT-2 folder or hub name)."""
    return (read_config(path) if os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME))
            else None)


def checkpoint_entry(config, name, checkpoint):
    """A task's entry in a loaded checkpoint's config ({} for a full or plain model); a task-module
    checkpoint must hold the task."""
    held = config.get("tasks", {})
    if config["mode"] == "adapter" and name not in held:
        raise VLMError(f"{checkpoint}: checkpoint holds {', '.join(held)}, not {name}")
    return held.get(name, {})


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
    if not (0 < args.top_p <= 1):  # also NaN
        raise VLMError(f"--top_p must be in (0, 1] (1 keeps every token), got {args.top_p}")
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
    prompts = [task.input_prompt(item, tokenizer, max_history, task_id, where) for item, where in items]
    outputs = generate(model, prompts, options, batch_size=args.batch_size, progress=False)
    for (item, _), ids in zip(items, outputs):
        text = task.output_text(tokenizer, ids, cleanup=not args.raw_text)
        print(json.dumps({"input": item, "output": text}, ensure_ascii=False) if args.input == "-" else text)


def common_training_arguments(parser):
    """Flags train.py and train_vlm.py share, with the same meaning and default."""
    parser.add_argument("--model_checkpoint", type=str, default="gpt2", help="GPT-2 hub name or local folder")
    parser.add_argument("--dataset_cache", type=str, default="./dataset_cache",
                        help="prefix of the tokenized-dataset cache files")
    parser.add_argument("--max_norm", type=float, default=1.0, help="gradient clipping norm")
    parser.add_argument("--eval_before_start", action="store_true", help="validate before training")
    parser.add_argument("--device", type=str, default=None,
                        help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--fp16", type=str, default="",
                        help="'' for fp32; an apex opt level (O1, O2, O3) for float16 autocast on CUDA")
    parser.add_argument("--local_rank", type=int, default=-1,
                        help="accepted for torch.distributed.launch; torchrun's environment is what is used")
    parser.add_argument("--task_file", type=str, default=None,
                        help="JSON task file of user tasks (NeMo-style prompt templates), "
                             "whose names --task(s) then take")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output_dir from its last complete checkpoint "
                             "(give the run's own flags again)")
    return parser
