"""The NeMo p-tuning article's study on any backbone, as one command (also `bash run.sh --stages
user_tasks`):

    python -m engines.prompt_study --model data/gpt2-stand-in
    python -m engines.prompt_study --model gpt2 \\
        --data sentiment=data/sentiment intent_and_slot=data/assistant \\
        --methods ptuning,adapter --fractions 1,0.1,0.05,0.01 --device cuda

Every step is one of the toolkit's own commands, printed before it runs:
1. baselines: zero-shot and k-shot prompting of the backbone, no training (evaluate.py --shots k);
2. the train-fraction sweep: every task x method x fraction trained on the first ceil(f x n)
   training records (data/prepare.py's --train_fraction cut of the shuffled split) and evaluated
   on the test split (train.py, evaluate.py);
3. continual learning: the tasks learned one after another into one VLM, each full-data run of the
   task file's own method added to the VLM the earlier tasks made (combine_all.py --vlm), every
   task evaluated in the last VLM (evaluate_vlm.py --task all), and each earlier task's predictions
   compared with those of the VLM it was first added to (they must be identical);
4. the output ceiling: for every token of the tasks' training answers, the lowest NLL any last
   hidden state of the frozen backbone gives it (models/output_ceiling.py). No method that leaves
   the final LayerNorm and the output layer frozen (all but `ln`) can do better than that.
Writes OUT/study.md (the tables), study.csv (one row per run and metric), study_ceiling.csv (one
row per answer token) and study.png (the headline metric against the train fraction, log x, one
line per task and method, baselines dashed). A step whose metrics file exists is not run again,
so an interrupted study resumes.
"""
import argparse
import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys

from tasks.task_file import load_task_file
from tasks.template import SPLIT_FILES
from utils.errors import ArgumentParser, VLMError, exit_on_user_error
from utils.io import atomic_path, write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADLINE = {"accuracy": "accuracy", "intent_slot": "intent_accuracy", "exact_match": "exact_match",
            "token_f1": "token_f1", "bleu": "bleu", "rouge": "rougeL"}
DEFAULT_LR = {"prompt": 0.3, "ptuning": 1e-2}  # others: --lr (default 1e-2); prompt tuning wants a large rate


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="data/gpt2-stand-in", help="backbone: a GPT-2 folder or hub name")
    parser.add_argument("--task_file", default="data/tasks/nemo_article.json")
    parser.add_argument("--data", nargs="+", default=["sentiment=data/samples/sentiment",
                                                      "intent_and_slot=data/samples/intent_and_slot"],
                        metavar="TASK=FOLDER",
                        help="each task's folder of train/valid/test.jsonl, in learning order")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods of the sweep "
                             "(default: each task file method, then adapter)")
    parser.add_argument("--fractions", default="1,0.1,0.05,0.01", help="train fractions of the sweep")
    parser.add_argument("--shots", default="0,3", help="baselines: k solved examples in the prompt")
    parser.add_argument("--n_epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=None, help="every method's rate (default: prompt 0.3, "
                                                                "ptuning 1e-2, others 1e-2)")
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", default="runs/prompt_study", help="where checkpoints and data cuts go")
    parser.add_argument("--output_dir", default="results/prompt_study",
                        help="where the tables and the plot go")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    args.tasks = load_task_file(args.task_file)
    args.folders = {}
    for item in args.data:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise VLMError(f"--data {item}: expected TASK=FOLDER")
        if name not in args.tasks:
            raise VLMError(f"--data {item}: {args.task_file} has no task {name!r} "
                           f"(has: {', '.join(args.tasks)})")
        args.folders[name] = folder
    try:
        args.fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
        args.shots = [int(k) for k in args.shots.split(",") if k.strip()]
    except ValueError as error:
        raise VLMError(f"--fractions / --shots: {error}") from None
    if not args.fractions or not all(0 < f <= 1 for f in args.fractions):
        raise VLMError("--fractions: give numbers in (0, 1]")
    if 1.0 not in args.fractions:
        raise VLMError("--fractions: the continual-learning part needs 1 "
                       "(each task's full-data run of its own method)")
    if args.methods is None:
        first = [args.tasks[name].method for name in args.folders]
        args.methods = list(dict.fromkeys(first + ["adapter"]))
    else:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from models.methods import parse_method_spec
    for method in args.methods:
        parse_method_spec(method, "--methods")
    missing = [t for t in args.folders if args.tasks[t].method not in args.methods]
    if missing:
        raise VLMError(f"--methods: the continual-learning part needs {args.tasks[missing[0]].method} "
                       f"({missing[0]}'s own method)")
    return args


class Runner:
    def __init__(self, dry_run):
        self.dry_run = dry_run

    def __call__(self, *command, done_if=None):
        """Run a repo script (unless `done_if` exists already); its failure stops the study."""
        if done_if and os.path.exists(done_if):
            print(f"= done already: {done_if}", flush=True)
            return
        argv = [sys.executable, *command]
        print("+ " + " ".join(argv), flush=True)
        if self.dry_run:
            return
        if subprocess.run(argv, cwd=ROOT).returncode != 0:
            raise VLMError(f"the study stopped: {' '.join(command[:3])} ... failed (its error is above)")


def fraction_folder(folder, fraction, out):
    """`out`: the folder with the first ceil(fraction x n) records of train.jsonl, valid and test as
    they are."""
    records = [line for line in open(os.path.join(folder, SPLIT_FILES["train"]), encoding="utf-8")
               if line.strip()]
    keep = math.ceil(fraction * len(records))
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, SPLIT_FILES["train"]), "".join(records[:keep]))
    for split in ("valid", "test"):
        shutil.copyfile(os.path.join(folder, SPLIT_FILES[split]), os.path.join(out, SPLIT_FILES[split]))
    return keep


def read_metrics(path):
    return json.load(open(path)) if os.path.isfile(path) else None


def run_study(args):
    run = Runner(args.dry_run)
    rows = []  # {task, setting, fraction, train_examples, metrics}
    common = ["--device", args.device]
    # 1. baselines
    for name, folder in args.folders.items():
        for k in args.shots:
            out = os.path.join(args.runs, "baselines", f"{name}_{k}shot")
            run("evaluate.py", "--task", name, "--task_file", args.task_file, "--model_checkpoint",
                args.model, "--dataset_path", folder, "--no_sample", "--shots", str(k), "--output_dir", out,
                "--seed", str(args.seed), *common, done_if=os.path.join(out, f"{name}_metrics.json"))
            rows.append({"task": name, "setting": f"{k}-shot prompting", "fraction": 1.0, "train_examples": 0,
                         "metrics": read_metrics(os.path.join(out, f"{name}_metrics.json"))})
    # 2. the sweep
    for name, folder in args.folders.items():
        for method in args.methods:
            for fraction in args.fractions:
                tag = f"{name}_{method}_f{fraction:g}"
                data = os.path.join(args.runs, "data", f"{name}_f{fraction:g}")
                n = fraction_folder(folder, fraction, data) if not args.dry_run else 0
                ckpt = os.path.join(args.runs, "train", tag)
                lr = args.lr if args.lr is not None else DEFAULT_LR.get(method, 1e-2)
                method_flag = [] if method == args.tasks[name].method else ["--method", method]
                run("train.py", "--task", name, "--task_file", args.task_file, "--dataset_path", data,
                    "--model_checkpoint", args.model, "--output_dir", ckpt, "--n_epochs", str(args.n_epochs),
                    "--lr", f"{lr:g}", "--train_batch_size", str(min(args.train_batch_size, max(n, 1))),
                    "--gradient_accumulation_steps", "1", "--seed", str(args.seed), *method_flag, *common,
                    done_if=os.path.join(ckpt, "vlm_config.json"))
                out = os.path.join(args.runs, "eval", tag)
                run("evaluate.py", "--task", name, "--model_checkpoint", ckpt, "--dataset_path", folder,
                    "--no_sample", "--output_dir", out, *common,
                    done_if=os.path.join(out, f"{name}_metrics.json"))
                rows.append({"task": name, "setting": method, "fraction": fraction, "train_examples": n,
                             "metrics": read_metrics(os.path.join(out, f"{name}_metrics.json"))})
    # 3. continual learning: each task's full-data run of its own method, added one after another
    vlms, previous, unchanged = [], None, {}
    for index, name in enumerate(args.folders):
        ckpt = os.path.join(args.runs, "train", f"{name}_{args.tasks[name].method}_f1")
        vlm = os.path.join(args.runs, "continual",
                           f"vlm{index + 1}_" + "+".join(list(args.folders)[:index + 1]))
        run("combine_all.py", ckpt, *(["--vlm", previous] if previous else []), "--output_dir", vlm,
            done_if=os.path.join(vlm, "vlm_config.json"))
        out = os.path.join(vlm + "_eval")
        run("evaluate_vlm.py", "--task", "all", "--model_checkpoint", vlm, "--no_sample", "--output_dir", out,
            "--dataset_paths", *[f"{t}={args.folders[t]}" for t in list(args.folders)[:index + 1]], *common,
            done_if=os.path.join(out, "summary.json"))
        vlms.append((vlm, out))
        previous = vlm
    if not args.dry_run and len(vlms) > 1:
        last = vlms[-1][1]
        for index, name in enumerate(list(args.folders)[:-1]):
            first = vlms[index][1]
            read = lambda folder: open(os.path.join(folder, f"{name}_output.txt"),  # noqa: E731
                                       encoding="utf-8").read()
            unchanged[name] = read(first) == read(last)
    continual = []
    if not args.dry_run:
        last = vlms[-1][1]
        for name in args.folders:
            continual.append({"task": name, "setting": f"in one VLM ({args.tasks[name].method})",
                              "fraction": 1.0, "train_examples": None,
                              "metrics": read_metrics(os.path.join(last, f"{name}_metrics.json"))})
    return rows, continual, unchanged


def answer_ceilings(args):
    """{task: [(token id, count in the train split's answers, lowest NLL)]}, most frequent first;
    the softmax over GPT-2's 50,257 tokens, the ones a user task's decoding draws from."""
    from collections import Counter

    from models.output_ceiling import output_ceiling
    from models.vlm import load_backbone
    from tasks.template import answer_token_ids, template_dataset
    from utils.data import load_tokenizer
    from utils.vocab import GPT2_VOCAB_SIZE
    tokenizer = load_tokenizer(args.model)
    gpt2 = load_backbone(args.model).to(args.device)
    ceilings = {}
    for name, folder in args.folders.items():
        task = args.tasks[name]
        counts = Counter()
        for item in template_dataset(task, folder, tokenizer, ["train"])["train"]:
            counts.update(answer_token_ids(task, item["record"], tokenizer))
        tokens = [token for token, _ in counts.most_common()]
        best = output_ceiling(gpt2, tokens, vocab=GPT2_VOCAB_SIZE)
        ceilings[name] = [(token, counts[token], nll) for token, nll in zip(tokens, best)]
    return ceilings, tokenizer


SHOWN_TOKENS = 6  # a task's most frequent answer tokens listed in study.md (the CSV has all)


def token_cell(tokenizer, token):
    """A token as a Markdown table cell: its text with escapes (`"\\n"`, `" neutral"`), in code."""
    return "`" + json.dumps(tokenizer.decode([token]), ensure_ascii=False).replace("|", "\\|") + "`"


def under_the_ceiling(methods):
    """The methods (specs such as prefix+ln) that leave the final LayerNorm and the output layer
    frozen."""
    from models.methods import METHODS, parse_method_spec
    return [m for m in methods if not any("layer_norm" in METHODS[n].points for n in parse_method_spec(m))]


def ceiling_lines(ceilings, tokenizer, methods):
    from tasks.template import EOS_ID
    frozen = under_the_ceiling(methods)
    which = (f"The methods {', '.join(frozen[:-1])} and {frozen[-1]} leave" if len(frozen) > 1 else
             f"The method {frozen[0]} leaves" if frozen else "Prompting and any method that leaves")
    lines = ["## What the frozen output layer allows", "",
             f"{which} the backbone's final LayerNorm and its (tied) output layer as they are, so the "
             "next-token distribution is softmax(ln_f(h) E^T) for some last hidden state h. For each token "
             "of the training answers, the lowest NLL any h gives it (a gradient search over h, "
             "`models/output_ceiling.py`): "
             "no such method, however trained, gives the token a higher probability.", "",
             "| task | answer token | share of answer tokens | lowest NLL | highest probability |",
             "|---|---|---:|---:|---:|"]
    for name, rows in ceilings.items():
        total = sum(count for _, count, _ in rows)
        listed = rows[:SHOWN_TOKENS] + [r for r in rows[SHOWN_TOKENS:] if r[0] == EOS_ID]
        for token, count, nll in listed:
            lines.append(f"| {name} | {token_cell(tokenizer, token)} | {count / total:.3f} | {nll:.2f} "
                         f"| {math.exp(-nll):.4f} |")
        if len(rows) > len(listed):
            nlls = sorted(nll for _, _, nll in rows)
            worst = max(rows, key=lambda r: r[2])
            lines.append(f"| {name} | all {len(rows)} distinct tokens | 1.000 | "
                         f"median {nlls[len(nlls) // 2]:.2f}, "
                         f"highest {worst[2]:.2f} ({token_cell(tokenizer, worst[0])}) | |")
    return lines + [""]


def write_ceiling_csv(path, ceilings, tokenizer):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["task", "token_id", "token", "count_in_train_answers", "lowest_nll",
                     "highest_probability"])
    for name, rows in ceilings.items():
        for token, count, nll in rows:
            writer.writerow([name, token, tokenizer.decode([token]), count, f"{nll:.4f}",
                             f"{math.exp(-nll):.6f}"])
    write_text(path, buffer.getvalue())


def headline(task, metrics):
    return metrics.get(HEADLINE[task.metric]) if metrics else None


def write_report(args, rows, continual, unchanged, ceilings=None, tokenizer=None):
    os.makedirs(args.output_dir, exist_ok=True)
    backbone = os.path.basename(os.path.normpath(args.model))
    lines = [f"# The p-tuning study on {backbone}", "",
             f"Backbone `{args.model}`; task file `{args.task_file}`; data "
             + ", ".join(f"{t} `{f}`" for t, f in args.folders.items())
             + f"; {args.n_epochs} epochs, batches of up to {args.train_batch_size}; "
             "greedy decoding of the test split. "
             "Command: `python -m engines.prompt_study " + " ".join(sys.argv[1:]) + "`.", ""]
    for name in args.folders:
        task = args.tasks[name]
        key = HEADLINE[task.metric]
        fractions = args.fractions
        lines += [f"## {name} ({key})", "",
                  "| setting | " + " | ".join(f"{f:g} of train" for f in fractions) + " |",
                  "|---|" + "---:|" * len(fractions)]
        for row in rows:
            if row["task"] == name and "shot" in row["setting"]:
                value = headline(task, row["metrics"])
                lines.append(f"| {row['setting']} (no training) | " + " | ".join(
                    [f"{value:.3f}" if value is not None else "-"] * len(fractions)) + " |")
        for method in args.methods:
            cells = []
            for fraction in fractions:
                row = next(r for r in rows
                           if r["task"] == name and r["setting"] == method and r["fraction"] == fraction)
                value = headline(task, row["metrics"])
                cells.append(f"{value:.3f} (n={row['train_examples']})" if value is not None else "-")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    if continual:
        lines += ["## Learned one after another into one VLM", "",
                  "| task | metrics in the last VLM | predictions unchanged after later tasks were added |",
                  "|---|---|---|"]
        for row in continual:
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in (row["metrics"] or {}).items()
                                if isinstance(v, float))
            same = unchanged.get(row["task"])
            lines.append(f"| {row['task']} | {metrics} | "
                         f"{'yes' if same else 'no' if same is False else '(last task)'} |")
        lines.append("")
    if ceilings:
        lines += ceiling_lines(ceilings, tokenizer, args.methods)
        write_ceiling_csv(os.path.join(args.output_dir, "study_ceiling.csv"), ceilings, tokenizer)
    write_text(os.path.join(args.output_dir, "study.md"), "\n".join(lines))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["task", "setting", "train_fraction", "train_examples", "metric", "value"])
    for row in rows + continual:
        for key, value in (row["metrics"] or {}).items():
            if isinstance(value, (int, float)) and key != "examples":
                writer.writerow([row["task"], row["setting"], row["fraction"], row["train_examples"], key,
                                 value])
    write_text(os.path.join(args.output_dir, "study.csv"), buffer.getvalue())
    plot(args, rows, os.path.join(args.output_dir, "study.png"))
    return "\n".join(lines)


def plot(args, rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(args.folders)
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        task = args.tasks[name]
        for method in args.methods:
            points = [(r["fraction"], headline(task, r["metrics"])) for r in rows
                      if r["task"] == name and r["setting"] == method and r["metrics"]]
            if points:
                ax.plot(*zip(*sorted(points)), marker="o", label=method)
        for row in rows:
            if row["task"] == name and "shot" in row["setting"] and row["metrics"]:
                ax.axhline(headline(task, row["metrics"]), linestyle="--", linewidth=1, color="grey")
                ax.annotate(row["setting"].replace(" prompting", ""),
                            (min(args.fractions), headline(task, row["metrics"])),
                            fontsize=7, color="grey", va="bottom")
        ax.set_xscale("log")
        ax.set_xlabel("train fraction")
        ax.set_ylabel(HEADLINE[task.metric])
        ax.set_title(name)
        ax.legend(fontsize=8)
    figure.suptitle(f"p-tuning study on {os.path.basename(os.path.normpath(args.model))}")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    rows, continual, unchanged = run_study(args)
    if args.dry_run:
        return
    ceilings, tokenizer = answer_ceilings(args)
    print(write_report(args, rows, continual, unchanged, ceilings, tokenizer))
    print(f"wrote {args.output_dir}/study.md, study.csv, study_ceiling.csv and study.png")


if __name__ == "__main__":
    main()
