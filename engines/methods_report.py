"""The method comparison of `run.sh --stages methods`: one table, one CSV and one plot of every
per-task method trained on the same tasks with one shared budget.

    python -m engines.methods_report RESULTS_ROOT --runs RUNS_ROOT [--tasks mt,nlg]

Reads, for every task and method,

    RESULTS/methods_result/<method>/<task>_metrics.json   (evaluate.py's scores)
    RUNS/methods/<task>_<method>/                          (the checkpoint: parameters; metrics.jsonl:
                                                            validation perplexity after the last epoch)

and, when the finetune stage ran, RESULTS/GPT2_result + RUNS/<task>_full as the 100% reference.
Writes RESULTS/methods.md (a table per task), RESULTS/methods.csv (one row per task and method:
task, method, parameters, extra_parameters_pct, val_ppl, then every metric) and
RESULTS/methods.png (per task: the task's headline metric and the validation perplexity against
extra parameters %, log x, one mark per method).

Extra parameters count what a task adds to the served model: its saved tensors (prefix tuning's
plain prefixes, p-tuning's prompt-table row, not the reparameterization they trained through)
and its own special-token rows, in % of the backbone with GPT-2's 50,257-row vocabulary.
"""
import csv
import io
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engines.report import (  # noqa: E402
    METRICS_FILE,
    NOT_SCORES,
    checkpoint_parameters,
    fmt,
    metrics_records,
    parse_report_args,
    read_json,
)
from models.methods import METHODS  # noqa: E402
from utils.errors import VLMError, exit_on_user_error  # noqa: E402
from utils.io import atomic_path, write_text  # noqa: E402

RESULTS_DIR = "methods_result"
RUNS_DIR = "methods"
FINETUNE = "fine-tune"  # the method column's name for the full fine-tuning reference
# The score each task's panel plots (the paper's headline metric of the task).
HEADLINE = {"dialogue": "f1", "qa": "f1", "mt": "bleu", "summarization": "rougeL", "nlg": "BLEU"}


def last_val_ppl(run):
    """Validation perplexity after the run's last epoch (metrics.jsonl), or None."""
    path = os.path.join(run, METRICS_FILE)
    if not os.path.isfile(path):
        return None
    ppl = None
    for record in metrics_records(path):
        ppl = record.get("val_ppl", ppl)
    return ppl


def scores_of(path):
    metrics = read_json(path, "metrics file")
    return {k: v for k, v in metrics.items()
            if k not in NOT_SCORES and isinstance(v, (int, float)) and not isinstance(v, bool)}


def collect(results_root, runs_root, tasks):
    """Rows {task, method, parameters, extra_pct, val_ppl, scores}: fine-tuning first (when it
    ran), then the methods in the registry's order, composed ones after."""
    rows, cache = [], {}
    found = sorted(os.listdir(os.path.join(results_root, RESULTS_DIR))) \
        if os.path.isdir(os.path.join(results_root, RESULTS_DIR)) else []
    order = {name: i for i, name in enumerate(METHODS)}
    found.sort(key=lambda m: (order.get(m, len(order)), m))
    for task in tasks:
        reference = os.path.join(results_root, "GPT2_result", f"{task}_metrics.json")
        if found and os.path.isfile(reference):
            run = os.path.join(runs_root, f"{task}_full")
            parameters, extra = checkpoint_parameters(run, "finetune", task, cache)
            rows.append({"task": task, "method": FINETUNE, "parameters": parameters, "extra_pct": extra,
                         "val_ppl": last_val_ppl(run), "scores": scores_of(reference)})
        for method in found:
            path = os.path.join(results_root, RESULTS_DIR, method, f"{task}_metrics.json")
            if not os.path.isfile(path):
                continue
            run = os.path.join(runs_root, RUNS_DIR, f"{task}_{method}")
            parameters, extra = checkpoint_parameters(run, "method", task, cache)
            rows.append({"task": task, "method": method, "parameters": parameters, "extra_pct": extra,
                         "val_ppl": last_val_ppl(run), "scores": scores_of(path)})
    return rows


def markdown(rows, tasks):
    lines = ["# Methods", "",
             "Every method trained with one shared budget per task (the same data, epochs, batches "
             "and learning",
             "rate). Extra parameters: what a task adds, in % of the GPT-2 backbone; val ppl: validation",
             "perplexity after the last epoch. The fine-tune row, where shown, is the finetune stage's "
             "run, trained",
             "with that stage's own budget (the authors' full fine-tuning epochs and rate).", ""]
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        if not task_rows:
            continue
        names = list(dict.fromkeys(k for r in task_rows for k in r["scores"]))
        lines += [f"## {task}", "",
                  "| method | parameters | extra parameters (%) | val ppl | " + " | ".join(names) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(names)]
        for r in task_rows:
            cells = [r["method"], fmt(r["parameters"]), fmt(r["extra_pct"]), fmt(r["val_ppl"])]
            cells += [fmt(r["scores"].get(name)) for name in names]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def csv_text(rows):
    names = list(dict.fromkeys(k for r in rows for k in r["scores"]))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["task", "method", "parameters", "extra_parameters_pct", "val_ppl", *names])
    for r in rows:
        values = [r["parameters"], r["extra_pct"], r["val_ppl"], *(r["scores"].get(n) for n in names)]
        writer.writerow([r["task"], r["method"], *("" if v is None else repr(v) for v in values)])
    return out.getvalue()


def plot(rows, tasks, path):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    tasks = [t for t in tasks if any(r["task"] == t and r["extra_pct"] for r in rows)]
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    markers = "osD^v<>phX*P8"
    for column, task in enumerate(tasks):
        task_rows = [r for r in rows if r["task"] == task and r["extra_pct"]]
        metric = HEADLINE.get(task)
        for row_index, (key, label) in enumerate(((metric, metric), ("val_ppl", "validation perplexity"))):
            ax = axes[row_index][column]
            for r in task_rows:
                value = r["val_ppl"] if key == "val_ppl" else r["scores"].get(key)
                if value is None or (isinstance(value, float) and not math.isfinite(value)):
                    continue
                ax.scatter(r["extra_pct"], value, color=colors[r["method"]],
                           marker=markers[methods.index(r["method"]) % len(markers)], label=r["method"], s=45)
                ax.annotate(r["method"], (r["extra_pct"], value), fontsize=7, xytext=(4, 3),
                            textcoords="offset points")
            ax.set_xscale("log")
            if key == "val_ppl":
                ax.set_yscale("log")
            ax.set_title(f"{task}: {label}")
            ax.set_xlabel("extra parameters (% of the backbone, log)")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize="small")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_methods_report(results_root, runs_root, tasks):
    rows = collect(results_root, runs_root, tasks)
    if not any(r["method"] != FINETUNE for r in rows):
        raise VLMError(f"{os.path.join(results_root, RESULTS_DIR)}: no <method>/<task>_metrics.json "
                       f"for tasks {', '.join(tasks)}")
    written = [os.path.join(results_root, name) for name in ("methods.md", "methods.csv", "methods.png")]
    write_text(written[0], markdown(rows, tasks))
    write_text(written[1], csv_text(rows))
    plot(rows, tasks, written[2])
    return rows, written


@exit_on_user_error
def main(argv=None):
    results_root, runs_root, tasks = parse_report_args(
        argv, "Collect run.sh --stages methods into methods.md, methods.csv and methods.png.",
        "folder holding methods_result/<method>/ (and GPT2_result/)",
        "folder holding methods/<task>_<method>/ (and <task>_full)")
    rows, written = write_methods_report(results_root, runs_root, tasks)
    print(markdown(rows, tasks))
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
