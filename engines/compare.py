"""The fair comparison of `run.sh --compare` (its methods stage): every method at its own learning
rate, chosen from a small grid on validation perplexity with one seed, then run with more seeds at
that rate. This module chooses the rate and reads the runs; engines/methods_report.py reports them.

    python -m engines.compare RUN_PARENT --rates 2e-4,6e-4,2e-3 [--seed 1]

RUN_PARENT is one task and method's folder (run.sh: RUNS/methods/<task>_<method>/). It holds one
train.py run folder per rate and seed, lr<RATE>_seed<SEED>/ (the rate as written in --rates), and,
once the grid is chosen, choice.json:

    {"seed": 1, "grid": [{"lr": "2e-4", "val_ppl": 120.5}, {"lr": "6e-4", "val_ppl": 98.25},
                         {"lr": "2e-3", "val_ppl": null}],
     "chosen_lr": "6e-4", "val_ppl": 98.25}

A grid run's validation perplexity is the one after its last epoch (metrics.jsonl), counted only
when the run finished (its final vlm_config.json is there); a run that failed (a NaN loss at a
too-large rate) or whose perplexity is not finite is null and never chosen. The lowest perplexity
wins; on a tie, the rate listed first. The command prints the chosen rate, as written in --rates,
on stdout (run.sh reads it) and the grid on stderr. A choice.json already there is the answer
(the grid is not looked at again), so a resumed stage keeps its choice; it must have been made
over the same rates and seed (delete it to choose again).
"""
import math
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engines.report import METRICS_FILE, metrics_records, read_json  # noqa: E402
from utils.errors import ArgumentParser, VLMError, exit_on_user_error  # noqa: E402
from utils.io import write_json  # noqa: E402

CHOICE_FILE = "choice.json"
FINISHED = "vlm_config.json"  # train.py writes the final checkpoint's config last


def run_name(rate, seed):
    return f"lr{rate}_seed{seed}"


def run_folder(parent, rate, seed):
    return os.path.join(parent, run_name(rate, seed))


def parse_rates(text):
    """'2e-4,6e-4,2e-3' -> ['2e-4', '6e-4', '2e-3']: positive finite numbers, none twice."""
    rates = [part.strip() for part in text.split(",") if part.strip()]
    if not rates:
        raise VLMError("--rates: give at least one learning rate")
    values = []
    for rate in rates:
        try:
            value = float(rate)
        except ValueError:
            raise VLMError(f"--rates: {rate!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise VLMError(f"--rates: {rate} is not a positive learning rate")
        if value in values:
            raise VLMError(f"--rates: {rate} is given twice")
        if not re.fullmatch(r"[0-9.eE+-]+", rate):
            raise VLMError(f"--rates: write {rate!r} as a plain number (it names run folders)")
        values.append(value)
    return rates


def finished(run):
    return os.path.isfile(os.path.join(run, FINISHED))


def final_val_ppl(run):
    """Validation perplexity after a finished run's last epoch; None when the run did not finish,
    logged no perplexity or a non-finite one."""
    path = os.path.join(run, METRICS_FILE)
    if not finished(run) or not os.path.isfile(path):
        return None
    ppl = None
    for record in metrics_records(path):
        if "val_ppl" in record:
            ppl = record["val_ppl"]
    if isinstance(ppl, bool) or not isinstance(ppl, (int, float)) or not math.isfinite(ppl):
        return None
    return float(ppl)


def choose(grid):
    """[(rate, val ppl or None)] -> the rate of the lowest perplexity (the first on a tie), or None
    when no run gave one."""
    best = None
    for rate, ppl in grid:
        if ppl is not None and (best is None or ppl < best[1]):
            best = (rate, ppl)
    return best


def read_choice(parent):
    """choice.json of a task and method's folder, checked, or None when there is none."""
    path = os.path.join(parent, CHOICE_FILE)
    if not os.path.isfile(path):
        return None
    choice = read_json(path, "learning-rate choice")
    grid = choice.get("grid") if isinstance(choice, dict) else None
    rates = [g.get("lr") for g in grid if isinstance(g, dict)] if isinstance(grid, list) else []
    if (not rates or len(rates) != len(grid) or not all(isinstance(r, str) for r in rates)
            or choice.get("chosen_lr") not in rates or not isinstance(choice.get("seed"), int)):
        raise VLMError(f"{path}: not a learning-rate choice (seed, grid of lr and val_ppl, chosen_lr); "
                       "delete it to choose again")
    return choice


def choose_rate(parent, rates, seed):
    """The recorded choice of `parent`, or the choice made now over the grid runs of `rates` at
    `seed` and written to choice.json (atomically)."""
    path = os.path.join(parent, CHOICE_FILE)
    recorded = read_choice(parent)
    if recorded is not None:
        made_over = [float(g["lr"]) for g in recorded["grid"]]
        if made_over != [float(r) for r in rates] or recorded["seed"] != seed:
            raise VLMError(f"{path}: made over the rates {','.join(g['lr'] for g in recorded['grid'])} with "
                           f"seed {recorded['seed']}, not {','.join(rates)} with seed {seed}; "
                           "delete it to choose again")
        return recorded, False
    grid = [(rate, final_val_ppl(run_folder(parent, rate, seed))) for rate in rates]
    best = choose(grid)
    if best is None:
        raise VLMError(f"{parent}: no grid run finished with a finite validation perplexity "
                       f"({', '.join(run_name(rate, seed) for rate in rates)})")
    choice = {"seed": seed, "grid": [{"lr": rate, "val_ppl": ppl} for rate, ppl in grid],
              "chosen_lr": best[0], "val_ppl": best[1]}
    write_json(path, choice)
    return choice, True


def seed_runs(parent, rate):
    """[(seed, run folder)] of the finished runs at `rate` (lr<rate>_seed<N>/), by seed."""
    if not os.path.isdir(parent):
        return []
    pattern = re.compile(re.escape(f"lr{rate}_seed") + r"([0-9]+)")
    found = []
    for name in os.listdir(parent):
        match = pattern.fullmatch(name)
        if match and finished(os.path.join(parent, name)):
            found.append((int(match.group(1)), os.path.join(parent, name)))
    return sorted(found)


def mean_std(values):
    """(mean, sample standard deviation (n - 1)) of numbers; the deviation is None for fewer than
    two, both None for none."""
    values = list(values)
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def beyond_spread(a, b):
    """Whether two (mean, std) differ by more than the sum of their standard deviations; None when
    a deviation is unknown (one seed)."""
    if a[0] is None or b[0] is None or a[1] is None or b[1] is None:
        return None
    return abs(a[0] - b[0]) > a[1] + b[1]


def describe(choice):
    shown = []
    for entry in choice["grid"]:
        ppl = "failed or not finite" if entry["val_ppl"] is None else f"val ppl {entry['val_ppl']:.4g}"
        chosen = " <- chosen" if entry["lr"] == choice["chosen_lr"] else ""
        shown.append(f"lr {entry['lr']}: {ppl}{chosen}")
    return "; ".join(shown)


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(description="Choose a method's learning rate: the grid run (lr<RATE>_seed<SEED>/ "
                                        "in RUN_PARENT) of the lowest final validation perplexity; "
                                        "recorded in RUN_PARENT/choice.json, printed on stdout.")
    parser.add_argument("run_parent", help="the task and method's folder of grid runs (run.sh: "
                                           "RUNS/methods/<task>_<method>)")
    parser.add_argument("--rates", required=True,
                        help="the grid, comma-separated, as the run folders name it")
    parser.add_argument("--seed", type=int, default=1, help="the seed of the grid runs (default 1)")
    args = parser.parse_args(argv)
    rates = parse_rates(args.rates)
    if not os.path.isdir(args.run_parent):
        raise VLMError(f"{args.run_parent}: no such folder of grid runs")
    choice, new = choose_rate(args.run_parent, rates, args.seed)
    where = os.path.join(args.run_parent, CHOICE_FILE)
    print(f"{args.run_parent}: {describe(choice)} ({'written to' if new else 'recorded in'} {where})",
          file=sys.stderr)
    print(choice["chosen_lr"])


if __name__ == "__main__":
    main()
