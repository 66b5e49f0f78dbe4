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

    python -m engines.methods_report RESULTS_ROOT --runs RUNS_ROOT --tasks mt,nlg --compare

reports the fair comparison of `run.sh --compare` instead (engines/compare.py): for every task and
method with a learning-rate choice,

    RUNS/methods/<task>_<method>/choice.json                     (the grid and the chosen rate)
    RUNS/methods/<task>_<method>/lr<RATE>_seed<S>/               (finished runs at the chosen rate)
    RESULTS/methods_result/<method>/lr<RATE>_seed<S>/<task>_metrics.json

(a seed counts once its run finished and was scored; method "finetune" is full fine-tuning, 100%).
Every figure is the mean and the sample standard deviation (n - 1) over those seeds. methods.md
gives per task each method's chosen rate, the grid's validation perplexities, the seeds and every
figure as mean ± std, then which differences exceed the spread: for the task's headline metric and
the validation perplexity, the best method against each other one, and every pair of methods whose
means differ by more than the sum of their standard deviations. methods.csv has one row per task
and method (task, method, lr, grid_val_ppl, seeds, parameters, extra_parameters_pct, val_ppl_mean,
val_ppl_std, <metric>_mean, <metric>_std ..., headline, headline_vs_best, val_ppl_vs_best: best,
beyond or within the spread, empty with fewer than two seeds); methods.png plots the means with
error bars of one standard deviation.
"""
import csv
import io
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engines.compare import (  # noqa: E402
    CHOICE_FILE,
    beyond_spread,
    final_val_ppl,
    mean_std,
    read_choice,
    run_folder,
    run_name,
    seed_runs,
)
from engines.report import (  # noqa: E402
    METRICS_FILE,
    NOT_SCORES,
    check_report_args,
    checkpoint_parameters,
    fmt,
    metrics_records,
    read_json,
    report_parser,
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


def plot_methods(rows, tasks, path, metric_of, figure_of, spread):
    """One column per task: its headline metric (top) and validation perplexity (bottom) against
    the extra parameters (log x), one mark per method; `figure_of(row, key)` is (value, std), and
    with `spread` the std is drawn as an error bar."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    tasks = [t for t in tasks if any(r["task"] == t and r["extra_pct"] for r in rows)]
    width, height = (5.5, 7.5) if spread else (5, 7)
    fig, axes = plt.subplots(2, max(len(tasks), 1), figsize=(width * max(len(tasks), 1), height),
                             squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    markers = "osD^v<>phX*P8d"
    for column, task in enumerate(tasks):
        task_rows = [r for r in rows if r["task"] == task and r["extra_pct"]]
        metric = metric_of(task, task_rows)
        for row_index, (key, label) in enumerate(((metric, metric), ("val_ppl", "validation perplexity"))):
            ax = axes[row_index][column]
            for r in task_rows:
                value, std = figure_of(r, key) if key is not None else (None, None)
                if value is None or not math.isfinite(value):
                    continue
                i = methods.index(r["method"])
                style = dict(color=f"C{i % 10}", label=r["method"])
                if spread:
                    ax.errorbar(r["extra_pct"], value, yerr=std or 0.0, fmt=markers[i % len(markers)],
                                capsize=3, markersize=6, **style)
                else:
                    ax.scatter(r["extra_pct"], value, marker=markers[i % len(markers)], s=45, **style)
                ax.annotate(r["method"], (r["extra_pct"], value), fontsize=7, xytext=(4, 3),
                            textcoords="offset points")
            ax.set_xscale("log")
            if key == "val_ppl":
                ax.set_yscale("log")
            ax.set_title(f"{task}: {label}" + (" (mean ± std over seeds)" if spread else ""))
            ax.set_xlabel("extra parameters (% of the backbone, log)")
            ax.set_ylabel(label or "")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize="small")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot(rows, tasks, path):
    def single(row, key):
        return (row["val_ppl"] if key == "val_ppl" else row["scores"].get(key)), None
    plot_methods(rows, tasks, path, lambda task, _: HEADLINE.get(task), single, spread=False)


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


# ---------------------------------------------------------------- the fair comparison (--compare)
FINETUNE_METHOD = "finetune"  # full fine-tuning's name among the compared methods


def compared_methods(names):
    """Method names in the report's order: fine-tuning, the registry's, then composed ones."""
    order = {name: i for i, name in enumerate(METHODS)}
    return sorted(names, key=lambda m: (m != FINETUNE_METHOD, order.get(m, len(order)), m))


def collect_compare(results_root, runs_root, tasks):
    """Rows {task, method, lr, grid [(lr, val ppl)], grid_seed, seeds, parameters, extra_pct,
    val_ppl (mean, std), scores {name: (mean, std)}, values {name: [per seed]}} of every task and
    method with a recorded choice."""
    rows, cache = [], {}
    base = os.path.join(runs_root, RUNS_DIR)
    folders = sorted(os.listdir(base)) if os.path.isdir(base) else []
    for task in tasks:
        methods = [name[len(task) + 1:] for name in folders
                   if name.startswith(f"{task}_") and os.path.isfile(os.path.join(base, name, CHOICE_FILE))]
        for method in compared_methods(methods):
            parent = os.path.join(base, f"{task}_{method}")
            choice = read_choice(parent)
            rate = choice["chosen_lr"]
            seeds, values = [], {"val_ppl": []}
            for seed, run in seed_runs(parent, rate):
                path = os.path.join(results_root, RESULTS_DIR, method, run_name(rate, seed),
                                    f"{task}_metrics.json")
                if not os.path.isfile(path):
                    continue  # not scored yet
                seeds.append(seed)
                ppl = final_val_ppl(run)
                if ppl is not None:
                    values["val_ppl"].append(ppl)
                for name, value in scores_of(path).items():
                    values.setdefault(name, []).append(value)
            parameters, extra = checkpoint_parameters(run_folder(parent, rate, choice["seed"]),
                                                      "finetune" if method == FINETUNE_METHOD else "method",
                                                      task, cache)
            rows.append({"task": task, "method": method, "lr": rate, "grid_seed": choice["seed"],
                         "grid": [(g["lr"], g.get("val_ppl")) for g in choice["grid"]], "seeds": seeds,
                         "parameters": parameters, "extra_pct": extra,
                         "val_ppl": mean_std(values["val_ppl"]),
                         "scores": {name: mean_std(v) for name, v in values.items() if name != "val_ppl"},
                         "values": values})
    return rows


def figure(row, key):
    """(mean, std) of a row's val_ppl or score `key`; (None, None) when it has none."""
    return row["val_ppl"] if key == "val_ppl" else row["scores"].get(key, (None, None))


def headline(task, task_rows):
    """The task's headline metric, or its first score when the metrics files lack it."""
    names = list(dict.fromkeys(k for r in task_rows for k in r["scores"]))
    preferred = HEADLINE.get(task)
    return preferred if preferred in names else (names[0] if names else None)


def separation(task_rows, key, higher_is_better):
    """(best row, {method: 'best' | 'beyond' | 'within' | None}, [(better, worse) pairs beyond the
    spread]) for one figure; None where a standard deviation is unknown (one seed)."""
    rows = [r for r in task_rows if figure(r, key)[0] is not None]
    if not rows:
        return None, {}, []
    sign = 1 if higher_is_better else -1
    ranked = sorted(rows, key=lambda r: -sign * figure(r, key)[0])  # best first; ties keep the table order
    best = ranked[0]
    verdicts = {}
    for r in task_rows:
        if r is best:
            verdicts[r["method"]] = "best"
        elif r in rows:
            beyond = beyond_spread(figure(best, key), figure(r, key))
            verdicts[r["method"]] = None if beyond is None else ("beyond" if beyond else "within")
        else:
            verdicts[r["method"]] = None
    pairs = [(a["method"], b["method"]) for i, a in enumerate(ranked) for b in ranked[i + 1:]
             if beyond_spread(figure(a, key), figure(b, key))]
    return best, verdicts, pairs


def mean_pm(stat):
    mean, std = stat
    if mean is None:
        return fmt(None)
    return f"{fmt(mean)} ± {fmt(std)}" if std is not None else f"{fmt(mean)} (one seed)"


def grid_cell(row):
    cells = []
    for rate, ppl in row["grid"]:
        text = f"{rate}: {fmt(ppl)}"
        cells.append(f"**{text}**" if rate == row["lr"] else text)
    return ", ".join(cells)


def spread_lines(task_rows, key, label, higher_is_better):
    best, verdicts, pairs = separation(task_rows, key, higher_is_better)
    if best is None:
        return []
    beyond = [m for m, v in verdicts.items() if v == "beyond"]
    within = [m for m, v in verdicts.items() if v == "within"]
    unknown = [m for m, v in verdicts.items() if v is None]
    n = len([r for r in task_rows if figure(r, key)[0] is not None])
    text = (f"- {label} ({'higher' if higher_is_better else 'lower'} is better): best {best['method']} "
            f"({mean_pm(figure(best, key))}); beyond the spread of the best: {', '.join(beyond) or 'none'}; "
            f"within it: {', '.join(within) or 'none'}")
    if unknown:
        text += f"; not comparable (one seed or no figure): {', '.join(unknown)}"
    lines = [text + "."]
    by_winner = {}
    for better, worse in pairs:
        by_winner.setdefault(better, []).append(worse)
    listed = "; ".join(f"{w} > {', '.join(losers)}" if higher_is_better else f"{w} < {', '.join(losers)}"
                       for w, losers in by_winner.items())
    lines.append(f"  Pairs beyond the spread: {len(pairs)} of {n * (n - 1) // 2}"
                 + (f": {listed}." if pairs else "."))
    return lines


def compare_markdown(rows, tasks):
    lines = ["# Methods: the fair comparison", "",
             "Every method trained on the same data, epochs and batches at its own learning rate: the rate",
             "of the lowest validation perplexity of its grid (one seed), then run with more seeds at that",
             "rate. Each figure is the mean ± the sample standard deviation (n − 1) over the seeds listed.",
             "Grid: each rate's validation perplexity after the last epoch on the grid's seed (— : the",
             "run failed or its perplexity was not finite), the chosen rate in bold. Extra parameters:",
             "what a task adds, in % of the backbone (full fine-tuning: 100). A difference exceeds the",
             "spread when the two means differ by more than the sum of their standard deviations.", ""]
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        if not task_rows:
            continue
        names = list(dict.fromkeys(k for r in task_rows for k in r["scores"]))
        lines += [f"## {task}", "",
                  "| method | lr | grid: val ppl | seeds | parameters | extra parameters (%) | val ppl | "
                  + " | ".join(names) + " |",
                  "|---|---:|---|---|---:|---:|---:|" + "---:|" * len(names)]
        for r in task_rows:
            cells = [r["method"], r["lr"], grid_cell(r), ",".join(map(str, r["seeds"])) or "—",
                     fmt(r["parameters"]), fmt(r["extra_pct"]), mean_pm(r["val_ppl"])]
            cells += [mean_pm(r["scores"].get(name, (None, None))) for name in names]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Differences beyond the spread ({task}):", ""]
        metric = headline(task, task_rows)
        if metric is not None:
            lines += spread_lines(task_rows, metric, metric, True)
        lines += spread_lines(task_rows, "val_ppl", "val ppl", False)
        lines.append("")
    return "\n".join(lines)


def compare_csv(rows, tasks):
    names = list(dict.fromkeys(k for r in rows for k in r["scores"]))
    verdicts = {}
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        metric = headline(task, task_rows)
        for key, higher in ((metric, True), ("val_ppl", False)):
            if key is None:
                continue
            for method, verdict in separation(task_rows, key, higher)[1].items():
                verdicts[(task, method, "val_ppl" if key == "val_ppl" else "headline")] = verdict
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["task", "method", "lr", "grid_val_ppl", "seeds", "parameters", "extra_parameters_pct",
                     "val_ppl_mean", "val_ppl_std", *(f"{n}_{s}" for n in names for s in ("mean", "std")),
                     "headline", "headline_vs_best", "val_ppl_vs_best"])

    def text(value):
        return "" if value is None else repr(value)

    for r in rows:
        task_rows = [x for x in rows if x["task"] == r["task"]]
        writer.writerow([
            r["task"], r["method"], r["lr"], ";".join(f"{lr}:{text(ppl)}" for lr, ppl in r["grid"]),
            ";".join(map(str, r["seeds"])), text(r["parameters"]), text(r["extra_pct"]),
            *map(text, r["val_ppl"]), *(text(v) for n in names for v in r["scores"].get(n, (None, None))),
            headline(r["task"], task_rows) or "",
            verdicts.get((r["task"], r["method"], "headline")) or "",
            verdicts.get((r["task"], r["method"], "val_ppl")) or ""])
    return out.getvalue()


def compare_plot(rows, tasks, path):
    plot_methods(rows, tasks, path, headline, figure, spread=True)


def write_compare_report(results_root, runs_root, tasks):
    rows = collect_compare(results_root, runs_root, tasks)
    if not rows:
        raise VLMError(f"{os.path.join(runs_root, RUNS_DIR)}: no <task>_<method>/{CHOICE_FILE} "
                       f"for tasks {', '.join(tasks)}")
    written = [os.path.join(results_root, name) for name in ("methods.md", "methods.csv", "methods.png")]
    write_text(written[0], compare_markdown(rows, tasks))
    write_text(written[1], compare_csv(rows, tasks))
    compare_plot(rows, tasks, written[2])
    return rows, written


@exit_on_user_error
def main(argv=None):
    parser = report_parser(
        "Collect run.sh --stages methods into methods.md, methods.csv and methods.png.",
        "folder holding methods_result/<method>/ (and GPT2_result/)",
        "folder holding methods/<task>_<method>/ (and <task>_full)")
    parser.add_argument("--compare", action="store_true",
                        help="the fair comparison of run.sh --compare: chosen rates, mean ± std over seeds")
    args = parser.parse_args(argv)
    results_root, runs_root, tasks = check_report_args(args)
    if args.compare:
        rows, written = write_compare_report(results_root, runs_root, tasks)
        print(compare_markdown(rows, tasks))
    else:
        rows, written = write_methods_report(results_root, runs_root, tasks)
        print(markdown(rows, tasks))
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
