"""Collect the reproduction's results into tables and a plot (the last step of run.sh).

    python -m engines.report RESULTS_ROOT --runs RUNS_ROOT [--tasks mt,nlg]

Reads, per setting, the metric files that evaluate.py / evaluate_vlm.py wrote and the checkpoint
the setting's numbers come from:

    setting     metrics                                  checkpoint (parameter counts)
    finetune    RESULTS/GPT2_result/<task>_metrics.json  RUNS/<task>_full
    adapter     RESULTS/adapter_result/...               RUNS/<task>_adapter
    adapter_gold RESULTS/adapter_gold_result/...         RUNS/<task>_adapter_gold
    emb_only    RESULTS/emb_only_result/...              RUNS/<task>_emb_only
    vlm         RESULTS/VLM_result/...                   RUNS/VLM (manifest.json of combine_all.py)
    multitask   RESULTS/multitask_result/...             RUNS/multitask

and writes RESULTS/summary.md (one table per task), RESULTS/summary.csv (long format:
task,setting,metric,value) and RESULTS/val_loss.png (validation loss per epoch of every
training run, from each run's metrics.jsonl).

"Extra parameters" follows the paper: the parameters a task adds, as a percentage of the GPT-2
backbone (its original 50,257-row vocabulary, as combine_all.py counts it). A fine-tuned GPT-2 is
a whole model per task: 100%.
"""
import csv
import io
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tasks.table import TASKS  # noqa: E402
from utils.errors import ArgumentParser, VLMError, exit_on_user_error  # noqa: E402
from utils.io import atomic_path, write_text  # noqa: E402
from utils.vocab import GPT2_VOCAB_SIZE  # noqa: E402

# (setting, label, results subfolder, run folder pattern)
SETTINGS = (
    ("finetune", "GPT-2 fine-tune", "GPT2_result", "{task}_full"),
    ("adapter", "Adapters", "adapter_result", "{task}_adapter"),
    ("adapter_gold", "Adapters", "adapter_gold_result", "{task}_adapter_gold"),
    ("emb_only", "Task embeddings only", "emb_only_result", "{task}_emb_only"),
    ("vlm", "VLM (combined)", "VLM_result", "VLM"),
    ("multitask", "Multi-task", "multitask_result", "multitask"),
)
# bookkeeping fields of a metrics file, not scores
NOT_SCORES = ("task", "examples", "turns")
METRICS_FILE = "metrics.jsonl"


def read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise VLMError(f"{path}: {what} is not valid JSON ({e})") from None


def safetensors_sizes(path):
    """{tensor name: element count} from a safetensors header, without loading the tensors."""
    from safetensors import safe_open
    sizes = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            sizes[key] = math.prod(f.get_slice(key).get_shape())
    return sizes


def backbone_parameters(gpt2_config):
    """Parameters of GPT-2 with its original vocabulary (the tied output layer counted once)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(**{**gpt2_config, "vocab_size": GPT2_VOCAB_SIZE})
    with torch.device("meta"):  # shapes only, no memory
        model = GPT2LMHeadModel(config)
    return sum(p.numel() for p in model.parameters())


def task_parameters(sizes, task):
    """Parameters a task owns in an adapter file: its adapters or other methods' tensors and its
    task-embedding rows."""
    return sum(n for key, n in sizes.items()
               if key.startswith((f"adapters.{task}.", f"methods.{task}."))
               or key == f"task_embeddings.{task}")


def checkpoint_parameters(folder, setting, task, cache):
    """(parameters of the task, extra parameters in % of the backbone) or (None, None)."""
    if setting == "vlm":
        manifest_path = os.path.join(folder, "manifest.json")
        if os.path.isfile(manifest_path):
            manifest = read_json(manifest_path, "combine manifest")
            for entry in manifest.get("tasks", []):
                if entry.get("name") == task:
                    backbone = manifest["backbone"]["parameters"]
                    return entry["parameters"], 100.0 * entry["parameters"] / backbone
            return None, None
    config_path = os.path.join(folder, "vlm_config.json")
    if not os.path.isfile(config_path):
        return None, None
    config = read_json(config_path, "checkpoint config")
    if config.get("mode") == "full":
        weights = os.path.join(folder, "model.safetensors")
        if not os.path.isfile(weights):
            return None, None
        return sum(safetensors_sizes(weights).values()), 100.0
    weights = os.path.join(folder, "adapters.safetensors")
    if not os.path.isfile(weights) or task not in config.get("tasks", {}):
        return None, None
    count = task_parameters(safetensors_sizes(weights), task)
    key = json.dumps(config["gpt2_config"], sort_keys=True)
    if key not in cache:
        cache[key] = backbone_parameters(config["gpt2_config"])
    return count, 100.0 * count / cache[key]


def run_label(folder, label):
    """The setting's label; adapters trained on distilled targets say so."""
    config_path = os.path.join(folder, "vlm_config.json")
    if label == "Adapters" and os.path.isfile(config_path):
        distilled = read_json(config_path, "checkpoint config").get("training_args", {}).get("distillation")
        return label + (" + distillation" if distilled else " (gold targets)")
    return label


def collect(results_root, runs_root, tasks):
    """Rows {task, setting, label, parameters, extra_pct, scores} for every metrics file found."""
    rows, cache = [], {}
    for task in tasks:
        for setting, label, subdir, run_pattern in SETTINGS:
            path = os.path.join(results_root, subdir, f"{task}_metrics.json")
            if not os.path.isfile(path):
                continue
            metrics = read_json(path, "metrics file")
            scores = {k: v for k, v in metrics.items()
                      if k not in NOT_SCORES and isinstance(v, (int, float)) and not isinstance(v, bool)}
            run = os.path.join(runs_root, run_pattern.format(task=task))
            parameters, extra = checkpoint_parameters(run, setting, task, cache)
            rows.append({"task": task, "setting": setting, "label": run_label(run, label),
                         "parameters": parameters, "extra_pct": extra, "scores": scores})
    return rows


def fmt(value):
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def markdown(rows, tasks):
    lines = ["# Results", "",
             "Extra parameters: what a task adds, in % of the GPT-2 backbone "
             "(fine-tuning: a whole model, 100%).", ""]
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        if not task_rows:
            continue
        names = list(dict.fromkeys(k for r in task_rows for k in r["scores"]))
        lines += [f"## {task}", "",
                  "| setting | parameters | extra parameters (%) | " + " | ".join(names) + " |",
                  "|---|---:|---:|" + "---:|" * len(names)]
        for r in task_rows:
            cells = [r["label"], fmt(r["parameters"]), fmt(r["extra_pct"])]
            cells += [fmt(r["scores"].get(name)) for name in names]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def csv_text(rows):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["task", "setting", "metric", "value"])
    for r in rows:
        for name, value in (("parameters", r["parameters"]), ("extra_parameters_pct", r["extra_pct"])):
            if value is not None:
                writer.writerow([r["task"], r["setting"], name, repr(value)])
        for name, value in r["scores"].items():
            writer.writerow([r["task"], r["setting"], name, repr(value)])
    return out.getvalue()


def metrics_records(path):
    """The records of a run's metrics.jsonl, in order (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise VLMError(f"{path}: line {number} is not valid JSON ({e})") from None


def read_curves(runs_root, tasks):
    """{task: {setting label: [(epoch, validation nll), ...]}} from the runs' metrics.jsonl."""
    curves = {task: {} for task in tasks}
    for setting, label, _, run_pattern in SETTINGS:
        if setting == "vlm":  # combined, not trained
            continue
        for task in tasks:
            path = os.path.join(runs_root, run_pattern.format(task=task), METRICS_FILE)
            if not os.path.isfile(path):
                continue
            points = []
            for record in metrics_records(path):
                # train.py: "val_nll"; train_vlm.py: "val": {task: {"nll", "ppl"}}
                nll = (record.get("val", {}).get(task, {}).get("nll") if "val" in record
                       else record.get("val_nll"))
                if nll is not None:
                    points.append((record["epoch"], nll))
            if points:
                curves[task][run_label(os.path.dirname(path), label)] = points
    return {task: c for task, c in curves.items() if c}


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    columns = min(3, len(curves))
    rows = math.ceil(len(curves) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.set_visible(False)
    # One colour per setting across all panels, in order of first appearance.
    labels = list(dict.fromkeys(label for runs in curves.values() for label in runs))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for ax, (task, runs) in zip(axes.flat, curves.items()):
        epochs = sorted({p[0] for points in runs.values() for p in points})
        ax.set_xticks(epochs if len(epochs) <= 12 else epochs[::math.ceil(len(epochs) / 12)])  # whole epochs
        for label, points in runs.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                    color=colors[label])
        ax.set_title(task)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation loss (NLL)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_report(results_root, runs_root, tasks):
    rows = collect(results_root, runs_root, tasks)
    if not rows:
        raise VLMError(f"{results_root}: no <task>_metrics.json in any of "
                       f"{', '.join(s[2] for s in SETTINGS)}")
    written = [os.path.join(results_root, "summary.md"), os.path.join(results_root, "summary.csv")]
    write_text(written[0], markdown(rows, tasks))
    write_text(written[1], csv_text(rows))
    curves = read_curves(runs_root, tasks)
    if curves:
        written.append(os.path.join(results_root, "val_loss.png"))
        plot(curves, written[-1])
    return rows, written


def report_parser(description, results_help, runs_help):
    """The command line every report shares: RESULTS_ROOT, --runs, --tasks."""
    parser = ArgumentParser(description=description)
    parser.add_argument("results_root", help=results_help)
    parser.add_argument("--runs", default="runs/repro", help=runs_help)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (default: all)")
    return parser


def parse_report_args(argv, description, results_help, runs_help):
    """(results root, runs root, [tasks]) of a report command line, checked."""
    return check_report_args(report_parser(description, results_help, runs_help).parse_args(argv))


def check_report_args(args):
    """(results root, runs root, [tasks]) of report_parser's parsed arguments, checked."""
    tasks = [t for t in args.tasks.split(",") if t]
    for task in tasks:
        if task not in TASKS:
            raise VLMError(f"--tasks: unknown task {task!r}; choose from {', '.join(TASKS)}")
    if not os.path.isdir(args.results_root):
        raise VLMError(f"{args.results_root}: results folder not found")
    return args.results_root, args.runs, tasks


@exit_on_user_error
def main(argv=None):
    results_root, runs_root, tasks = parse_report_args(
        argv, "Collect the results of run.sh into summary.md, summary.csv and val_loss.png.",
        "folder holding GPT2_result/, adapter_result/, VLM_result/, multitask_result/, ...",
        "folder holding the run folders (<task>_full, ...)")
    rows, written = write_report(results_root, runs_root, tasks)
    print(markdown(rows, tasks))
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
