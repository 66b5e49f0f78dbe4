"""The fair comparison (`run.sh --compare`, its methods stage): the learning-rate choice
(engines/compare.py), the report's arithmetic over seeds (engines/methods_report.py --compare), the
stage's commands (--dry-run) and its resumption (a fake interpreter stands in for train.py and
evaluate.py and runs the real choice and report)."""
import csv
import json
import os
import sys

import pytest

from tasks.table import TASKS
from tests.conftest import run_script
from tests.test_run_sh import (
    commands,
    flag,
    method_checkpoint,
    run_sh,
    script_calls,
    small_backbone_parameters,
    write_jsonl,
)

ALL_METHODS = ("adapter", "houlsby", "parallel", "lora", "prefix", "prompt", "ptuning", "ln", "adapterbias",
               "compacter", "krona", "unipelt")


def grid_run(parent, rate, val_ppls, seed=1, finished=True):
    """A run folder lr<rate>_seed<seed>/ whose metrics.jsonl logs `val_ppls`, one per epoch;
    finished: the final vlm_config.json is there."""
    folder = os.path.join(parent, f"lr{rate}_seed{seed}")
    write_jsonl(os.path.join(folder, "metrics.jsonl"),
                [{"epoch": i + 1, "val_nll": 1.0, "val_ppl": p} for i, p in enumerate(val_ppls)])
    if finished:
        with open(os.path.join(folder, "vlm_config.json"), "w") as f:
            json.dump({"format": "vlm", "mode": "adapter", "tasks": {}}, f)
    return folder


def choose(parent, rates, seed=1):
    return run_script("-m", "engines.compare", str(parent), "--rates", rates, "--seed", str(seed))


# ---------------------------------------------------------------- the learning-rate choice

def test_the_choice_is_the_lowest_final_validation_perplexity(tmp_path):
    parent = tmp_path / "mt_lora"
    grid_run(parent, "1e-4", [30.0, 20.0])           # final 20: the last epoch counts, not the best
    grid_run(parent, "3e-4", [9.0, 12.5])            # final 12.5: chosen
    grid_run(parent, "1e-3", [5.0], finished=False)  # lower, but the run did not finish
    grid_run(parent, "3e-3", [8.0, None])            # a non-finite perplexity (logged as null)
    grid_run(parent, "3e-4", [1.0], seed=2)          # another seed is not the grid's
    result = choose(parent, "1e-4,3e-4,1e-3,3e-3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "3e-4\n"
    choice = json.loads((parent / "choice.json").read_text())
    assert choice == {"seed": 1, "chosen_lr": "3e-4", "val_ppl": 12.5,
                      "grid": [{"lr": "1e-4", "val_ppl": 20.0}, {"lr": "3e-4", "val_ppl": 12.5},
                               {"lr": "1e-3", "val_ppl": None}, {"lr": "3e-3", "val_ppl": None}]}
    assert "lr 3e-4: val ppl 12.5 <- chosen" in result.stderr

    # recorded: the grid is not looked at again, even when its runs change
    grid_run(parent, "1e-4", [2.0])
    again = choose(parent, "1e-4,3e-4,1e-3,3e-3")
    assert again.returncode == 0 and again.stdout == "3e-4\n"
    assert json.loads((parent / "choice.json").read_text()) == choice
    # ... but only for the same grid and seed
    other = choose(parent, "1e-4,3e-4", seed=1)
    assert other.returncode == 2 and other.stdout == ""
    assert other.stderr.strip() == (f"error: {parent}/choice.json: made over the rates 1e-4,3e-4,1e-3,3e-3 "
                                    "with seed 1, not 1e-4,3e-4 with seed 1; delete it to choose again")


def test_a_tie_goes_to_the_rate_listed_first_and_no_finished_run_is_an_error(tmp_path):
    parent = tmp_path / "nlg_prompt"
    grid_run(parent, "0.3", [7.0])
    grid_run(parent, "0.1", [7.0])
    assert choose(parent, "0.3,0.1").stdout == "0.3\n"
    empty = tmp_path / "nlg_ln"
    grid_run(empty, "1e-3", [4.0], finished=False)
    result = choose(empty, "1e-3,3e-3")
    assert result.returncode == 2 and not (empty / "choice.json").exists()
    assert result.stderr.strip() == (f"error: {empty}: no grid run finished with a finite validation "
                                     "perplexity (lr1e-3_seed1, lr3e-3_seed1)")


@pytest.mark.parametrize("rates,message", [
    ("1e-3,abc", "--rates: 'abc' is not a number"),
    ("1e-3,-1", "--rates: -1 is not a positive learning rate"),
    ("1e-3,0.001", "--rates: 0.001 is given twice"),
    (",", "--rates: give at least one learning rate"),
])
def test_bad_rates_are_one_error_line(tmp_path, rates, message):
    result = choose(tmp_path, rates)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {message}"


# ---------------------------------------------------------------- the report over seeds

def scored_seed(runs, results, task, method, rate, seed, val_ppl, scores, keys):
    """A finished run at `rate` and `seed` with its checkpoint, final `val_ppl` and `scores`."""
    method_checkpoint(os.path.join(runs, "methods", f"{task}_{method}", f"lr{rate}_seed{seed}"), task, keys,
                      [val_ppl * 2, val_ppl])
    folder = os.path.join(results, "methods_result", method, f"lr{rate}_seed{seed}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{task}_metrics.json"), "w") as f:
        json.dump({"task": task, "examples": 200, **scores}, f)


def record_choice(runs, task, method, grid, chosen):
    parent = os.path.join(runs, "methods", f"{task}_{method}")
    os.makedirs(parent, exist_ok=True)
    with open(os.path.join(parent, "choice.json"), "w") as f:
        json.dump({"seed": 1, "grid": [{"lr": lr, "val_ppl": p} for lr, p in grid], "chosen_lr": chosen,
                   "val_ppl": dict(grid)[chosen]}, f)


@pytest.fixture
def compare_tree(tmp_path):
    results, runs = str(tmp_path / "results"), str(tmp_path / "runs")
    lora = {"methods.mt.lora.0.q.a": 8, "methods.mt.lora.0.q.b": 4}            # 12 + 3 rows = 15
    prefix = {"methods.mt.prefix.keys": 6}                                     # 6 + 3 = 9
    adapter = {"adapters.mt.0.project_down.weight": 20}                        # 20 + 3 = 23
    record_choice(runs, "mt", "lora", [("2e-4", 30.0), ("6e-4", 12.0), ("2e-3", None)], "6e-4")
    for seed, ppl, bleu in ((1, 10.0, 1.0), (2, 12.0, 2.0), (3, 14.0, 3.0)):
        scored_seed(runs, results, "mt", "lora", "6e-4", seed, ppl, {"bleu": bleu, "rouge1": 0.5}, lora)
    # the grid's other rates and an unscored fourth seed do not count
    scored_seed(runs, results, "mt", "lora", "2e-4", 1, 30.0, {"bleu": 50.0}, lora)
    method_checkpoint(os.path.join(runs, "methods", "mt_lora", "lr6e-4_seed4"), "mt", lora, [1.0])
    record_choice(runs, "mt", "prefix", [("1e-3", 20.0), ("3e-3", 16.0)], "3e-3")
    for seed, ppl, bleu in ((1, 15.0, 2.5), (2, 16.0, 3.0), (3, 17.0, 3.5)):
        scored_seed(runs, results, "mt", "prefix", "3e-3", seed, ppl, {"bleu": bleu}, prefix)
    record_choice(runs, "mt", "adapter", [("5e-4", 9.0)], "5e-4")
    for seed, ppl, bleu in ((1, 8.0, 6.0), (2, 9.0, 7.0), (3, 10.0, 8.0)):
        scored_seed(runs, results, "mt", "adapter", "5e-4", seed, ppl, {"bleu": bleu}, adapter)
    record_choice(runs, "nlg", "lora", [("2e-4", 5.0)], "2e-4")  # one seed so far
    scored_seed(runs, results, "nlg", "lora", "2e-4", 1, 5.0, {"BLEU": 0.25},
                {"methods.nlg.lora.0.q.a": 8})
    return results, runs


def test_compare_report_means_stds_and_chosen_rates(compare_tree):
    results, runs = compare_tree
    result = run_script("-m", "engines.methods_report", results, "--runs", runs, "--tasks", "mt,nlg",
                        "--compare")
    assert result.returncode == 0, result.stderr
    backbone = small_backbone_parameters()
    with open(os.path.join(results, "methods.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["task", "method", "lr", "grid_val_ppl", "seeds", "parameters", "extra_parameters_pct",
                       "val_ppl_mean", "val_ppl_std", "bleu_mean", "bleu_std", "rouge1_mean", "rouge1_std",
                       "BLEU_mean", "BLEU_std", "headline", "headline_vs_best", "val_ppl_vs_best"]
    assert rows[1:] == [
        # registry order: adapter, lora, prefix; bleu 6, 7, 8: mean 7, sample std 1
        ["mt", "adapter", "5e-4", "5e-4:9.0", "1;2;3", "23", repr(100.0 * 23 / backbone), "9.0", "1.0",
         "7.0", "1.0", "", "", "", "", "bleu", "best", "best"],
        # val ppl 10, 12, 14: 12 ± 2; bleu 1, 2, 3: 2 ± 1 (7 - 2 > 1 + 1: beyond the best's spread);
        # 12 - 9 = 3 > 2 + 1? no: 3 is not more than 3, within
        ["mt", "lora", "6e-4", "2e-4:30.0;6e-4:12.0;2e-3:", "1;2;3", "15", repr(100.0 * 15 / backbone),
         "12.0", "2.0", "2.0", "1.0", "0.5", "0.0", "", "", "bleu", "beyond", "within"],
        # bleu 2.5, 3, 3.5: 3 ± 0.5 (7 - 3 > 1 + 0.5); val ppl 16 ± 1 (16 - 9 > 1 + 1)
        ["mt", "prefix", "3e-3", "1e-3:20.0;3e-3:16.0", "1;2;3", "9", repr(100.0 * 9 / backbone),
         "16.0", "1.0", "3.0", "0.5", "", "", "", "", "bleu", "beyond", "beyond"],
        # one seed: no deviation, nothing to compare
        ["nlg", "lora", "2e-4", "2e-4:5.0", "1", "11", repr(100.0 * 11 / backbone), "5.0", "", "", "", "", "",
         "0.25", "", "BLEU", "best", "best"]]
    table = open(os.path.join(results, "methods.md")).read()
    assert ("| lora | 6e-4 | 2e-4: 30, **6e-4: 12**, 2e-3: — | 1,2,3 | 15 | "
            f"{100.0 * 15 / backbone:.4g} | 12 ± 2 | 2 ± 1 | 0.5 ± 0 |") in table
    assert "| lora | 2e-4 | **2e-4: 5** | 1 | 11 |" in table and "| 0.25 (one seed) |" in table
    # the differences beyond the spread: best against each, then every pair
    assert ("- bleu (higher is better): best adapter (7 ± 1); beyond the spread of the best: lora, prefix; "
            "within it: none.") in table
    assert "  Pairs beyond the spread: 2 of 3: adapter > prefix, lora." in table  # prefix - lora: 1 < 1.5
    assert ("- val ppl (lower is better): best adapter (9 ± 1); beyond the spread of the best: prefix; "
            "within it: lora.") in table
    assert "  Pairs beyond the spread: 2 of 3: adapter < prefix; lora < prefix." in table  # 16 - 12 > 1 + 2
    with open(os.path.join(results, "methods.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_report_without_choices_is_one_error_line(tmp_path):
    result = run_script("-m", "engines.methods_report", str(tmp_path), "--runs", str(tmp_path / "runs"),
                        "--tasks", "mt", "--compare")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {tmp_path}/runs/methods: no <task>_<method>/choice.json "
                                     "for tasks mt")


# ---------------------------------------------------------------- run.sh --compare --dry-run

GRIDS = {"finetune": ["6.25e-5", "2.5e-4", "1e-3"], "lora": ["2e-4", "6e-4", "2e-3"],
         "prompt": ["0.03", "0.1", "0.3"]}


def test_compare_dry_run_prepares_the_data_then_grid_choice_seeds_and_scores():
    result = run_sh("--compare", "--dry-run", "--methods", "finetune,lora,prompt+ln", "--out", "/x",
                    "--shared", "/rel", "--data", "/d")
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    m = "/rel/multi30k"
    assert cmds[:3] == [
        ["/bin/false", "data/prepare.py", "mt", "--train", f"{m}/train.en.gz", f"{m}/train.de.gz",
         "--slice", "train", "0:2000", "--valid", f"{m}/val.en.gz", f"{m}/val.de.gz",
         "--slice", "valid", "0:250",
         "--test", f"{m}/test_2016_flickr.en.gz", f"{m}/test_2016_flickr.de.gz", "--slice", "test", "0:200",
         "--output", "/d/compare/mt.json"],
        # mt validates on its split named test: train.py's copy holds the validation slice there
        ["/bin/false", "data/prepare.py", "mt", "--train", f"{m}/train.en.gz", f"{m}/train.de.gz",
         "--slice", "train", "0:2000", "--test", f"{m}/val.en.gz", f"{m}/val.de.gz",
         "--slice", "test", "0:250",
         "--output", "/d/compare/mt_training.json"],
        ["/bin/false", "data/prepare.py", "nlg", "--train", "/rel/e2e/trainset.csv",
         "--slice", "train", "0:2000",
         "--valid", "/rel/e2e/devset.csv", "--slice", "valid", "0:30", "--test", "/rel/e2e/devset.csv",
         "--slice", "test", "30:230", "--output", "/d/compare/nlg.json"]]
    assert TASKS["mt"].splits == ("train", "test") and TASKS["nlg"].splits == ("train", "valid")
    rest = cmds[3:]
    for task in ("mt", "nlg"):  # the default tasks, in this order
        train_data = "/d/compare/mt_training.json" if task == "mt" else "/d/compare/nlg.json"
        for method in ("finetune", "lora", "prompt+ln"):
            parent = f"/x/runs/methods/{task}_{method}"
            grid = GRIDS[method.split("+")[0]]  # a composed method takes its first part's grid
            steps = rest[:9]
            rest = rest[9:]
            trains, choose, seeds, scores = steps[:3], steps[3], steps[4:6], steps[6:9]
            for c in trains + seeds:
                assert c[:2] == ["/bin/false", "train.py"] and flag(c, "--task") == task
                assert flag(c, "--dataset_path") == train_data
                assert flag(c, "--model_checkpoint") == "data/gpt2-stand-in"
                assert [flag(c, f) for f in ("--train_batch_size", "--gradient_accumulation_steps",
                                             "--n_epochs")] == ["8", "1", "1"]
                assert ("--method" in c) == (method != "finetune")
                if method != "finetune":
                    assert flag(c, "--method") == method
            # the grid on seed 1, then the choice, then seeds 2 and 3 at the chosen rate
            assert [(flag(c, "--lr"), flag(c, "--seed"), flag(c, "--output_dir")) for c in trains] == [
                (lr, "1", f"{parent}/lr{lr}_seed1") for lr in grid]
            assert choose == ["/bin/false", "-m", "engines.compare", parent, "--rates", ",".join(grid),
                              "--seed", "1"]
            assert [(flag(c, "--lr"), flag(c, "--seed"), flag(c, "--output_dir")) for c in seeds] == [
                ("CHOSEN", s, f"{parent}/lrCHOSEN_seed{s}") for s in ("2", "3")]
            assert [(c[1], flag(c, "--task"), flag(c, "--dataset_path"), flag(c, "--model_checkpoint"),
                     flag(c, "--output_dir"), flag(c, "--max_length")) for c in scores] == [
                ("evaluate.py", task, f"/d/compare/{task}.json", f"{parent}/lrCHOSEN_seed{s}",
                 f"/x/results/methods_result/{method}/lrCHOSEN_seed{s}", "80") for s in (1, 2, 3)]
    assert rest == [["/bin/false", "-m", "engines.methods_report", "/x/results", "--runs", "/x/runs",
                     "--tasks", "mt,nlg", "--compare"]]


def test_compare_defaults_every_method_with_a_grid_and_its_own_folders():
    result = run_sh("--compare", "--dry-run", "--tasks", "nlg")
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    chooses = [c for c in cmds if "engines.compare" in c]
    assert [c[3] for c in chooses] == [f"runs/compare/methods/nlg_{m}" for m in ("finetune", *ALL_METHODS)]
    for c in chooses:
        rates = [float(r) for r in flag(c, "--rates").split(",")]
        assert len(rates) == 3 and rates == sorted(rates) and all(r > 0 for r in rates)
    assert cmds[-1] == ["/bin/false", "-m", "engines.methods_report", "results/compare",
                        "--runs", "runs/compare", "--tasks", "nlg", "--compare"]
    assert len(script_calls(cmds, "train.py")) == 13 * 5 and len(script_calls(cmds, "evaluate.py")) == 13 * 3


@pytest.mark.parametrize("args,message", [
    (["--compare", "--mini"], "--compare and --mini exclude each other"),
    (["--compare", "--tasks", "mt,qa"], "--compare: no data for task 'qa' (it compares mt,nlg)"),
    (["--compare", "--stages", "methods,finetune"], "--compare runs the methods stage only, not 'finetune'"),
    (["--stages", "methods", "--methods", "finetune,lora"],
     "--methods: finetune is a method of --compare only"),
    (["--compare", "--methods", "finetune+ln"], "--methods: unknown method 'finetune'"),
    (["--compare", "--shared"], "--shared needs a value"),
])
def test_compare_refuses_what_it_cannot_do(args, message):
    result = run_sh("--dry-run", *args)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"run.sh: {message}")


def test_compare_without_the_releases_is_one_error_line(tmp_path):
    result = run_sh("--compare", "--tasks", "nlg", "--shared", str(tmp_path), "--data", str(tmp_path / "d"),
                    "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"run.sh: --compare: {tmp_path}/e2e/trainset.csv not found: it prepares "
                                     f"{tmp_path}/d/compare/ from the raw releases (--shared DIR)")


# ---------------------------------------------------------------- resumption, with a fake interpreter

# Stands in for python: logs every command line; train.py writes a run folder (metrics.jsonl with a
# final validation perplexity given by the rate and seed, then vlm_config.json), or fails at the rate
# FAKE_FAIL_LR as a diverging run does; evaluate.py writes <task>_metrics.json; `-m` modules (the
# choice and the report) run for real.
FAKE_PYTHON = r'''#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
if args[0] == "-m":
    os.execv({python!r}, [{python!r}] + args)
def flag(name):
    return args[args.index(name) + 1]
if args[0] == "train.py":
    out, lr, seed = flag("--output_dir"), flag("--lr"), int(flag("--seed"))
    if lr == os.environ.get("FAKE_FAIL_LR"):
        print("error: training loss is nan at epoch 1, iteration 3", file=sys.stderr)
        sys.exit(2)
    os.makedirs(out, exist_ok=True)
    ppl = {{"2e-4": 30.0, "6e-4": 20.0, "2e-3": 25.0}}[lr] + seed
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({{"epoch": 1, "val_nll": 1.0, "val_ppl": ppl}}) + "\n")
    with open(os.path.join(out, "vlm_config.json"), "w") as f:
        json.dump({{"format": "vlm", "mode": "adapter", "tasks": {{}}}}, f)
elif args[0] == "evaluate.py":
    out, task = flag("--output_dir"), flag("--task")
    seed = int(flag("--model_checkpoint").rsplit("seed", 1)[1])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, task + "_metrics.json"), "w") as f:
        json.dump({{"task": task, "examples": 1, "BLEU": float(seed)}}, f)
else:
    sys.exit("fake python: unexpected " + " ".join(args))
'''


def fake_run(tmp_path, fail_lr=""):
    """bash run.sh --compare on nlg with lora through the fake python; (result, logged commands)."""
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    log = tmp_path / "log.jsonl"
    log.write_text("")
    os.environ["FAKE_LOG"] = str(log)
    os.environ["FAKE_FAIL_LR"] = fail_lr
    try:
        result = run_sh("--compare", "--tasks", "nlg", "--methods", "lora", "--data", str(tmp_path / "data"),
                        "--out", str(tmp_path / "out"), python=str(python), timeout=300)
    finally:
        del os.environ["FAKE_LOG"], os.environ["FAKE_FAIL_LR"]
    return result, [json.loads(line) for line in log.read_text().splitlines()]


def trained(logged):
    return [(flag(c, "--lr"), flag(c, "--seed"), "--resume" in c) for c in logged if c[0] == "train.py"]


def test_an_interrupted_comparison_continues_where_it_stopped(tmp_path):
    data = tmp_path / "data" / "compare"
    data.mkdir(parents=True)
    (data / "nlg.json").write_text("{}")  # prepared already: not prepared again
    runs = tmp_path / "out" / "runs" / "methods" / "nlg_lora"
    grid_run(runs, "2e-4", [31.0])        # finished before the interruption: skipped
    interrupted = runs / "lr6e-4_seed1"   # killed after its first epoch's checkpoint: resumed
    (interrupted / "checkpoint_epoch1").mkdir(parents=True)
    (interrupted / "checkpoint_epoch1" / "training_state.json").write_text("{}")
    fresh = runs / "lr2e-3_seed1"         # killed before any checkpoint: started again
    fresh.mkdir()
    (fresh / "events.out").write_text("partial")
    result, logged = fake_run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"== {runs}/lr2e-4_seed1 holds a finished checkpoint; not retrained" in result.stdout
    assert f"+ rm -rf {fresh}" in result.stdout and not (fresh / "events.out").exists()
    assert trained(logged) == [("6e-4", "1", True), ("2e-3", "1", False), ("6e-4", "2", False),
                               ("6e-4", "3", False)]
    assert [c[0] for c in logged] == ["train.py", "train.py", "-m", "train.py", "train.py", "evaluate.py",
                                      "evaluate.py", "evaluate.py", "-m"]
    assert json.loads((runs / "choice.json").read_text())["chosen_lr"] == "6e-4"  # 21 < 26 < 31
    csv_rows = list(csv.DictReader(open(tmp_path / "out" / "results" / "methods.csv")))
    assert [(r["method"], r["lr"], r["seeds"], r["val_ppl_mean"], r["BLEU_mean"], r["BLEU_std"])
            for r in csv_rows] == [("lora", "6e-4", "1;2;3", "22.0", "2.0", "1.0")]

    # everything done: run again, nothing is trained or decoded, the recorded choice stands
    grid_run(runs, "2e-4", [1.0])  # would win now, were the grid looked at again
    result, logged = fake_run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [c[:2] for c in logged] == [["-m", "engines.compare"], ["-m", "engines.methods_report"]]
    assert f"== {runs}/choice.json records the grid's choice; the grid is not run again" in result.stdout
    assert "holds the scores of nlg; not decoded again" in result.stdout
    assert json.loads((runs / "choice.json").read_text())["chosen_lr"] == "6e-4"


def test_a_diverging_grid_run_is_left_out_and_the_stage_goes_on(tmp_path):
    (tmp_path / "data" / "compare").mkdir(parents=True)
    (tmp_path / "data" / "compare" / "nlg.json").write_text("{}")
    result, logged = fake_run(tmp_path, fail_lr="6e-4")
    assert result.returncode == 0, result.stdout + result.stderr
    runs = tmp_path / "out" / "runs" / "methods" / "nlg_lora"
    assert f"== {runs}/lr6e-4_seed1: training failed (exit 2); left out of the comparison" in result.stdout
    choice = json.loads((runs / "choice.json").read_text())
    assert choice["grid"] == [{"lr": "2e-4", "val_ppl": 31.0}, {"lr": "6e-4", "val_ppl": None},
                              {"lr": "2e-3", "val_ppl": 26.0}]
    assert trained(logged)[3:] == [("2e-3", "2", False), ("2e-3", "3", False)]
