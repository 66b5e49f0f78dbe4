"""Evaluate a combined VLM checkpoint (several tasks' adapters over one GPT-2): one task, or all its tasks.

    python evaluate_vlm.py --task mt --no_sample --model_checkpoint runs/VLM
    python evaluate_vlm.py --task all --no_sample --model_checkpoint runs/VLM \\
        --dataset_paths mt=data/NMT/data_en_ge.json nlg=data/NLG/data.json
    python evaluate_vlm.py --task nlg --no_sample --model_checkpoint runs/VLM \
        --input "name[The Vaults], eatType[pub]"
    python evaluate_vlm.py --task all --no_sample --model_checkpoint runs/VLM \
        --dataset_paths sentiment=data/samples/sentiment mt=data/samples/mt.json     (a user task's folder)

Each task decodes exactly as evaluate.py does on that task's own checkpoint (other tasks' special
tokens are never generated). `--task all` puts every task's prompts in one list, so rows of different
tasks share batches and forward passes (the model picks each row's adapters), then scores each task
and writes `summary.json` and `summary.md` beside the per-task files.
"""
import logging
import os
from dataclasses import asdict

from engines.cli import check_decoding_arguments, decode_user_input, decoding_arguments, known_user_tasks
from engines.evaluation import evaluation_records, finish_task, format_metrics
from engines.generate import generate
from models.checkpoint import CONFIG_NAME, load_checkpoint, read_config
from tasks.table import TASKS, get_task, parse_dataset_paths
from utils.errors import ArgumentParser, VLMError, exit_on_user_error
from utils.io import write_json, write_text

DEFAULT_OUTPUT_DIR = "results/VLM_result"  # the authors' folder


def checkpoint_tasks(path):
    """{task: settings} of a checkpoint, read from its config before the (large) model is loaded."""
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        where = "not found" if not os.path.exists(path) else f"no {CONFIG_NAME}: not a VLM checkpoint"
        raise VLMError(f"--model_checkpoint {path}: {where} (a plain GPT-2 is evaluated with evaluate.py)")
    tasks = read_config(path).get("tasks") or {}
    if not isinstance(tasks, dict) or not tasks:
        raise VLMError(f"{os.path.join(path, CONFIG_NAME)}: the checkpoint holds no tasks")
    unknown = [name for name, entry in tasks.items()
               if name not in TASKS and not (isinstance(entry, dict) and "template" in entry)]
    if unknown:
        raise VLMError(f"{os.path.join(path, CONFIG_NAME)}: unknown task {unknown[0]!r} "
                       "in the checkpoint config")
    return tasks


def select_tasks(args, held, user_tasks):
    """Task names to evaluate (checkpoint order for `all`) and each one's dataset file (a user
    task's folder, which --dataset_paths or --dataset_path must give)."""
    names = list(held) if args.task == "all" else [get_task(args.task, user_tasks).name]
    for name in names:
        if name not in held:
            raise VLMError(f"--task {name}: {args.model_checkpoint} holds {', '.join(held)}, not {name}")
    paths = parse_dataset_paths(args.dataset_paths, user_tasks)
    for name, path in paths.items():
        if name not in held:
            raise VLMError(f"--dataset_paths {name}={path}: {args.model_checkpoint} holds "
                           f"{', '.join(held)}, not {name}")
    if args.dataset_path:
        if len(names) > 1:
            raise VLMError("--dataset_path names one task's file; "
                           "with --task all use --dataset_paths TASK=PATH ...")
        if names[0] in paths:
            raise VLMError(f"--dataset_path and --dataset_paths both give the {names[0]} file; keep one")
        paths[names[0]] = args.dataset_path
    paths = {name: paths.get(name, get_task(name, user_tasks).default_dataset) for name in names}
    if args.input is None:  # cheap mistakes first, before the model loads
        for name, path in paths.items():
            get_task(name, user_tasks).check_dataset_path(path, f"--dataset_paths {name}={path}")
    return paths


def adapter_task_id(model, task):
    """The task's adapters if the model has them; -1 (plain GPT-2 rows) for a full-model checkpoint."""
    return model.task_id(task.name)


def evaluate_tasks(model, tokenizer, dataset_paths, options, args, output_dir, user_tasks=None):
    """Decode the evaluation splits of all tasks together and score each; returns {task: metrics}.

    All prompts go to ONE generate() call, so its length-sorted batches mix tasks and each forward
    pass routes every row through its own task's adapters. A row's output does not depend on the
    other rows of its batch, so every task gets the outputs of a single-task run."""
    parts, prompts = [], []
    for name, path in dataset_paths.items():
        task = get_task(name, user_tasks)
        task_id = adapter_task_id(model, task)
        max_history = task.max_history if args.max_history is None else args.max_history
        records = evaluation_records(task, path, tokenizer, args.dataset_cache)
        task_prompts = task.dataset_prompts(records, max_history, tokenizer, task_id)
        for index, prompt in enumerate(task_prompts):
            # A sampled row's generator is seeded by this index: the task's own numbering, as in
            # a single-task run, not the position in the combined list.
            prompt.meta["index"] = index
        parts.append((task, task_id, max_history, records,
                      slice(len(prompts), len(prompts) + len(task_prompts))))
        prompts.extend(task_prompts)

    generated = generate(model, prompts, options, batch_size=args.batch_size,
                         desc="+".join(dataset_paths) if len(dataset_paths) > 1
                         else next(iter(dataset_paths)))
    return {task.name: finish_task(model, tokenizer, task, records, prompts[span], generated[span], task_id,
                                   max_history, args.batch_size, output_dir, cleanup=not args.raw_text)
            for task, task_id, max_history, records, span in parts}


def write_summary(output_dir, checkpoint, options, results):
    """`summary.json` (all tasks' metrics and the decoding settings) and a markdown table of it."""
    write_json(os.path.join(output_dir, "summary.json"),
               {"model_checkpoint": checkpoint, "decoding": asdict(options), "tasks": results})
    lines = ["| task | examples | metrics |", "|---|---:|---|"]
    for name, result in results.items():
        scores = ", ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                           for key, value in result.items() if key not in ("task", "examples"))
        lines.append(f"| {name} | {result['examples']} | {scores} |")
    write_text(os.path.join(output_dir, "summary.md"), "\n".join(lines) + "\n")


@exit_on_user_error
def main(argv=None):
    parser = decoding_arguments(ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--task", type=str, default="dialogue",
                        help="a task of the checkpoint (mt, summarization, dialogue, qa, nlg) or all")
    parser.add_argument("--dataset_paths", nargs="*", default=[], metavar="TASK=PATH",
                        help="dataset file per task (default: each task's path in the task table)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.task == "all" and args.input is not None:
        raise VLMError("--input decodes one task: give --task TASK, not all")
    held = checkpoint_tasks(args.model_checkpoint)
    user_tasks = known_user_tasks(args, read_config(args.model_checkpoint))
    if args.task != "all":
        get_task(args.task, user_tasks)
    options = check_decoding_arguments(args)
    dataset_paths = select_tasks(args, held, user_tasks)

    model, tokenizer, _ = load_checkpoint(args.model_checkpoint, args.device)
    if args.input is not None:
        task = get_task(args.task, user_tasks)
        decode_user_input(model, tokenizer, task, args, options, adapter_task_id(model, task))
        return
    output_dir = args.output_dir or DEFAULT_OUTPUT_DIR
    results = evaluate_tasks(model, tokenizer, dataset_paths, options, args, output_dir, user_tasks)
    for result in results.values():
        print(format_metrics(result))
    if args.task == "all":
        write_summary(output_dir, args.model_checkpoint, options, results)
        print(f"outputs, references, per-task metrics, summary.json and summary.md written to {output_dir}")
    else:
        print(f"outputs, references and {args.task}_metrics.json written to {output_dir}")


if __name__ == "__main__":
    main()
