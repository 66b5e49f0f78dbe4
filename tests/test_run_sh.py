"""run.sh (the reproduction pipeline) and engines/report.py (its summary tables and plot)."""
import csv
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tasks.table import TASKS
from tests.conftest import REPO, run_script
from utils.vocab import GPT2_VOCAB_SIZE

ALL = ("dialogue", "qa", "mt", "summarization", "nlg")


def run_sh(*args, python="/bin/false", timeout=60):
    """bash run.sh ARGS; PYTHON=/bin/false by default, so any command actually run would fail."""
    env = dict(os.environ, PYTHON=python, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false")
    return subprocess.run(["bash", os.path.join(REPO, "run.sh"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def commands(stdout):
    """The printed commands ("+ cmd ...") as argument lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def script_calls(cmds, script, task=None):
    return [c for c in cmds
            if script in c and (task is None or ("--task" in c and flag(c, "--task") == task))]


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry") / "out"
    result = run_sh("--dry-run", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert not out.exists()  # nothing ran: not even a folder was made
    return out, commands(result.stdout)


def test_dry_run_prints_the_pipeline_and_runs_nothing(dry):
    out, cmds = dry
    runs, results = f"{out}/runs", f"{out}/results"
    # every command goes through $PYTHON, but the clean-up before combining
    assert [c for c in cmds if c[0] != "/bin/false"] == [["rm", "-rf", f"{runs}/VLM"]]
    mt_train = script_calls(cmds, "train.py", "mt")
    assert len(mt_train) == 2  # full fine-tuning, adapters
    assert "--adapter_bottleneck" not in mt_train[0]
    assert flag(mt_train[1], "--adapter_bottleneck") == "300"
    assert "--distillation" in mt_train[1]
    assert flag(mt_train[1], "--output_dir") == f"{runs}/mt_adapter"
    # distillation from the task's fine-tuned GPT-2, for exactly these tasks, before the adapter run
    distilled = {flag(c, "--task"): c for c in script_calls(cmds, "sentence_distiller.py")}
    assert set(distilled) == {"mt", "summarization", "dialogue"}
    for task, cmd in distilled.items():
        assert "--no_sample" in cmd
        assert flag(cmd, "--model_checkpoint") == f"{runs}/{task}_full"
        assert flag(cmd, "--dataset_path") == TASKS[task].default_dataset
        adapter_train = script_calls(cmds, "train.py", task)[1]
        assert flag(adapter_train, "--dataset_path") == flag(cmd, "--output")
        assert cmds.index(cmd) < cmds.index(adapter_train)
    for task in ("qa", "nlg"):
        assert "--distillation" not in script_calls(cmds, "train.py", task)[1]
    evaluations = script_calls(cmds, "evaluate.py")
    assert [(flag(c, "--task"), flag(c, "--model_checkpoint"), flag(c, "--output_dir"))
            for c in evaluations] == (
        [(t, f"{runs}/{t}_full", f"{results}/GPT2_result") for t in ALL]
        + [(t, f"{runs}/{t}_adapter", f"{results}/adapter_result") for t in ALL])
    assert all("--no_sample" in c for c in evaluations)
    combine = script_calls(cmds, "combine_all.py")
    assert combine == [["/bin/false", "combine_all.py", *[f"{runs}/{t}_adapter" for t in ALL],
                        "--output_dir", f"{runs}/VLM"]]
    vlm_evals = script_calls(cmds, "evaluate_vlm.py")
    assert [(flag(c, "--task"), flag(c, "--model_checkpoint"), flag(c, "--output_dir"))
            for c in vlm_evals] == [
        ("all", f"{runs}/VLM", f"{results}/VLM_result"),
        ("all", f"{runs}/multitask", f"{results}/multitask_result")]
    pairs = [f"{t}={TASKS[t].default_dataset}" for t in ALL]
    for c in vlm_evals:
        assert c[c.index("--dataset_paths") + 1:][:5] == pairs
    multitask = script_calls(cmds, "train_vlm.py")
    assert len(multitask) == 1
    m = multitask[0]
    assert m[m.index("--tasks") + 1:][:5] == list(ALL)
    assert [flag(m, f) for f in ("--gradient_accumulation_steps", "--train_batch_size", "--valid_batch_size",
                                 "--n_epochs", "--output_dir")] == ["16", "1", "1", "3", f"{runs}/multitask"]
    # order of the stages, and the report last
    order = [next(i for i, c in enumerate(cmds) if s in c) for s in
             ("train.py", "sentence_distiller.py", "combine_all.py", "evaluate_vlm.py", "train_vlm.py")]
    assert order == sorted(order)
    assert cmds[-1] == ["/bin/false", "-m", "engines.report", results, "--runs", runs,
                        "--tasks", ",".join(ALL)]


def test_mini_dry_run_is_every_stage_on_the_stand_in_and_the_samples():
    result = run_sh("--mini", "--dry-run")
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    runs, results = "runs/mini", "results/mini"
    for c in cmds:
        if "--model_checkpoint" in c and c[1] in ("train.py", "train_vlm.py"):
            assert flag(c, "--model_checkpoint") == "data/gpt2-stand-in"
        if "--dataset_path" in c:  # the samples, or their distilled copy
            task = flag(c, "--task")
            expected = (f"{runs}/distilled/{task}.json" if "--distillation" in c
                        else f"data/samples/{task}.json")
            assert flag(c, "--dataset_path") == expected
    for task in ALL:
        trains = {flag(c, "--output_dir"): c for c in script_calls(cmds, "train.py", task)}
        distilled = task in ("mt", "summarization", "dialogue")
        expected = [f"{runs}/{task}_{s}"
                    for s in ("full", "adapter", *(["adapter_gold"] if distilled else []), "emb_only")]
        assert list(trains) == expected
        # the authors' epochs and learning rates, batches of 8 without accumulation
        hyper = TASKS[task]
        full, adapter, emb = trains[expected[0]], trains[expected[1]], trains[expected[-1]]
        assert [flag(full, f)
                for f in ("--n_epochs", "--train_batch_size", "--gradient_accumulation_steps")] \
            == [str(hyper.full_finetune.n_epochs), "8", "1"]
        assert float(flag(full, "--lr")) == hyper.full_finetune.lr
        assert ("--distillation" in adapter) == distilled
        assert "--emb_only" in emb and "--adapter_bottleneck" not in emb
        assert float(flag(emb, "--lr")) == hyper.adapter.lr
        if distilled:
            gold = trains[f"{runs}/{task}_adapter_gold"]
            assert ("--distillation" not in gold
                    and flag(gold, "--dataset_path") == f"data/samples/{task}.json")
            assert flag(gold, "--adapter_bottleneck") == flag(adapter, "--adapter_bottleneck")
    outputs = {flag(c, "--output_dir") for c in script_calls(cmds, "evaluate.py")}
    assert outputs == {f"{results}/{d}" for d in ("GPT2_result", "adapter_result", "adapter_gold_result",
                                                  "emb_only_result")}
    assert [flag(c, "--output_dir") for c in script_calls(cmds, "evaluate_vlm.py")] == [
        f"{results}/VLM_result", f"{results}/multitask_result"]
    assert cmds[-1] == ["/bin/false", "-m", "engines.report", results, "--runs", runs,
                        "--tasks", ",".join(ALL)]


def test_mini_and_smoke_exclude_each_other():
    result = run_sh("--mini", "--smoke", "--dry-run")
    assert result.returncode == 2 and result.stderr.startswith(
        "run.sh: --smoke and --mini exclude each other")


def test_default_dry_run_writes_into_runs_repro_and_results_without_creating_them():
    before = os.path.exists(os.path.join(REPO, "runs", "repro"))
    result = run_sh("--dry-run", "--stages", "finetune", "--tasks", "nlg")
    assert result.returncode == 0, result.stderr
    assert os.path.exists(os.path.join(REPO, "runs", "repro")) == before
    train, evaluate, report = commands(result.stdout)
    assert flag(train, "--output_dir") == "runs/repro/nlg_full"
    assert flag(train, "--dataset_path") == "data/NLG/data.json"
    assert flag(evaluate, "--output_dir") == "results/GPT2_result"
    assert report[3:5] == ["results", "--runs"]


@pytest.mark.parametrize("task", ALL)
def test_hyper_parameters_are_the_task_tables(dry, task):
    _, cmds = dry
    full, adapter = script_calls(cmds, "train.py", task)
    spec = TASKS[task]
    for cmd, hyper in ((full, spec.full_finetune), (adapter, spec.adapter)):
        assert int(flag(cmd, "--train_batch_size")) == hyper.train_batch_size
        assert int(flag(cmd, "--valid_batch_size")) == hyper.train_batch_size
        assert int(flag(cmd, "--gradient_accumulation_steps")) == hyper.gradient_accumulation_steps
        assert float(flag(cmd, "--lr")) == hyper.lr
        assert int(flag(cmd, "--max_history")) == spec.max_history
        assert flag(cmd, "--model_checkpoint") == "gpt2"
    assert int(flag(full, "--n_epochs")) == spec.full_finetune.n_epochs
    # the authors' distilled summarization adapters train 5 epochs instead of the table's 10
    assert int(flag(adapter, "--n_epochs")) == (5 if task == "summarization" else spec.adapter.n_epochs)
    assert int(flag(adapter, "--adapter_bottleneck")) == spec.bottleneck
    assert flag(full, "--dataset_path") == spec.default_dataset


def test_no_distillation_uses_gold_targets_and_table_epochs():
    result = run_sh("--dry-run", "--stages", "adapter", "--no-distillation", "--out", "/nonexistent/x")
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    assert script_calls(cmds, "sentence_distiller.py") == []
    assert not any("--distillation" in c for c in cmds)
    summarization = script_calls(cmds, "train.py", "summarization")[0]
    assert int(flag(summarization, "--n_epochs")) == TASKS["summarization"].adapter.n_epochs


def test_stage_and_task_selection():
    result = run_sh("--dry-run", "--stages", "combine,vlm", "--tasks", "mt,nlg", "--out", "/nonexistent/x")
    assert result.returncode == 0, result.stderr
    scripts = [c[1] for c in commands(result.stdout) if c[0] == "/bin/false"]
    assert scripts == ["combine_all.py", "evaluate_vlm.py", "-m"]
    combine = script_calls(commands(result.stdout), "combine_all.py")[0]
    assert combine[2:4] == ["/nonexistent/x/runs/mt_adapter", "/nonexistent/x/runs/nlg_adapter"]

    result = run_sh("--dry-run", "--skip", "finetune", "--skip", "multitask", "--tasks", "qa",
                    "--data", "/d", "--model", "/m", "--device", "cpu", "--out", "/nonexistent/x")
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    assert [c[1] for c in cmds if c[0] == "/bin/false"] == ["train.py", "evaluate.py", "combine_all.py",
                                                            "evaluate_vlm.py", "-m"]
    train = script_calls(cmds, "train.py")[0]
    assert flag(train, "--dataset_path") == "/d/CoQA/data.json"
    assert flag(train, "--model_checkpoint") == "/m"
    # combine_all.py works on CPU and takes no --device
    assert all(flag(c, "--device") == "cpu" for c in cmds
               if c[0] == "/bin/false" and c[1] not in ("-m", "combine_all.py"))


@pytest.mark.parametrize("args,message", [
    (["--stages", "finetune,oops"], "unknown stage 'oops'"),
    (["--skip", "nope"], "unknown stage 'nope'"),
    (["--tasks", "mt,chat"], "--tasks: unknown task 'chat'"),
    (["--stages", "vlm", "--skip", "vlm"], "no stage left to run"),
    (["--frobnicate"], "unknown option --frobnicate"),
    (["--out"], "--out needs a value"),
])
def test_bad_options_fail_with_one_line(args, message):
    result = run_sh("--dry-run", *args)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"run.sh: {message}")
    assert result.stdout == ""


# ---------------------------------------------------------------- engines.report on a fake tree

SMALL = dict(n_layer=1, n_embd=8, n_head=2, n_positions=16)


def small_backbone_parameters():
    """GPT-2 parameter count by hand (original vocabulary, tied output layer)."""
    d, p = SMALL["n_embd"], SMALL["n_positions"]
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return GPT2_VOCAB_SIZE * d + p * d + SMALL["n_layer"] * block + 2 * d


def write_metrics(root, subdir, task, metrics):
    os.makedirs(os.path.join(root, subdir), exist_ok=True)
    with open(os.path.join(root, subdir, f"{task}_metrics.json"), "w") as f:
        json.dump({"task": task, "examples": 10, **metrics}, f)


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def adapter_checkpoint(folder, tasks, distillation=None, adapters=True):
    """vlm_config.json + adapters.safetensors: task t owns 10*(i+1) adapter (unless not adapters) and
    3 embedding values; distillation=True/False goes into the recorded training arguments."""
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for i, t in enumerate(tasks):
        if adapters:
            tensors[f"adapters.{t}.0.project_down.weight"] = torch.zeros(2, 5 * (i + 1))
        tensors[f"task_embeddings.{t}"] = torch.zeros(1, 3)
    save_file(tensors, os.path.join(folder, "adapters.safetensors"))
    config = {"format": "vlm", "mode": "adapter",
              "tasks": {t: {"bottleneck": 2 if adapters else 0} for t in tasks},
              "gpt2_config": dict(SMALL, vocab_size=GPT2_VOCAB_SIZE + 30)}
    if distillation is not None:
        config["training_args"] = {"distillation": distillation}
    with open(os.path.join(folder, "vlm_config.json"), "w") as f:
        json.dump(config, f)


@pytest.fixture
def fake_tree(tmp_path):
    results, runs = str(tmp_path / "results"), str(tmp_path / "runs")
    write_metrics(results, "GPT2_result", "mt", {"bleu": 20.5, "rouge1": 0.25})
    write_metrics(results, "adapter_result", "mt", {"bleu": 19.0, "rouge1": 0.5})
    write_metrics(results, "VLM_result", "mt", {"bleu": 19.0, "rouge1": 0.5})
    write_metrics(results, "multitask_result", "mt", {"bleu": 18.0})
    write_metrics(results, "adapter_result", "nlg", {"BLEU": 0.625, "turns": 3})
    write_metrics(results, "adapter_gold_result", "mt", {"bleu": 17.0})
    write_metrics(results, "emb_only_result", "mt", {"bleu": 2.0})
    os.makedirs(f"{runs}/mt_full")
    save_file({"transformer.wte.weight": torch.zeros(7, 4), "transformer.h.0.bias": torch.zeros(5)},
              f"{runs}/mt_full/model.safetensors")
    with open(f"{runs}/mt_full/vlm_config.json", "w") as f:
        json.dump({"format": "vlm", "mode": "full", "tasks": {"mt": {"bottleneck": 0}}}, f)
    adapter_checkpoint(f"{runs}/mt_adapter", ["mt"], distillation=True)  # mt: 10 + 3 = 13
    adapter_checkpoint(f"{runs}/mt_adapter_gold", ["mt"], distillation=False)
    adapter_checkpoint(f"{runs}/mt_emb_only", ["mt"], distillation=False, adapters=False)  # 3
    adapter_checkpoint(f"{runs}/multitask", ["nlg", "mt"])    # mt second: 20 + 3 = 23
    os.makedirs(f"{runs}/VLM")
    with open(f"{runs}/VLM/manifest.json", "w") as f:
        json.dump({"backbone": {"parameters": 1000}, "tasks": [{"name": "mt", "parameters": 50}]}, f)
    write_jsonl(f"{runs}/mt_full/metrics.jsonl", [{"epoch": 1, "val_nll": 3.0}, {"epoch": 2, "val_nll": 2.5}])
    write_jsonl(f"{runs}/mt_adapter/metrics.jsonl", [{"epoch": 1, "val_nll": 3.5}])
    write_jsonl(f"{runs}/multitask/metrics.jsonl",
                [{"epoch": 1, "val": {"mt": {"nll": 4.0, "ppl": 54.6}, "nlg": {"nll": 2.0, "ppl": 7.4}}}])
    return results, runs


def test_report_tables_csv_and_plot(fake_tree):
    results, runs = fake_tree
    result = run_script("-m", "engines.report", results, "--runs", runs, "--tasks", "mt,nlg")
    assert result.returncode == 0, result.stderr
    backbone = small_backbone_parameters()
    with open(os.path.join(results, "summary.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["task", "setting", "metric", "value"],
        ["mt", "finetune", "parameters", "33"], ["mt", "finetune", "extra_parameters_pct", "100.0"],
        ["mt", "finetune", "bleu", "20.5"], ["mt", "finetune", "rouge1", "0.25"],
        ["mt", "adapter", "parameters", "13"],
        ["mt", "adapter", "extra_parameters_pct", repr(100.0 * 13 / backbone)],
        ["mt", "adapter", "bleu", "19.0"], ["mt", "adapter", "rouge1", "0.5"],
        ["mt", "adapter_gold", "parameters", "13"],
        ["mt", "adapter_gold", "extra_parameters_pct", repr(100.0 * 13 / backbone)],
        ["mt", "adapter_gold", "bleu", "17.0"],
        ["mt", "emb_only", "parameters", "3"],
        ["mt", "emb_only", "extra_parameters_pct", repr(100.0 * 3 / backbone)],
        ["mt", "emb_only", "bleu", "2.0"],
        ["mt", "vlm", "parameters", "50"], ["mt", "vlm", "extra_parameters_pct", "5.0"],
        ["mt", "vlm", "bleu", "19.0"], ["mt", "vlm", "rouge1", "0.5"],
        ["mt", "multitask", "parameters", "23"],
        ["mt", "multitask", "extra_parameters_pct", repr(100.0 * 23 / backbone)],
        ["mt", "multitask", "bleu", "18.0"],
        # no nlg_adapter checkpoint: no parameter rows; "turns" is no score
        ["nlg", "adapter", "BLEU", "0.625"],
    ]
    with open(os.path.join(results, "summary.md")) as f:
        md = f.read().splitlines()
    assert "| setting | parameters | extra parameters (%) | bleu | rouge1 |" in md
    assert "| GPT-2 fine-tune | 33 | 100 | 20.5 | 0.25 |" in md
    assert f"| Adapters + distillation | 13 | {100.0 * 13 / backbone:.4g} | 19 | 0.5 |" in md
    assert f"| Adapters (gold targets) | 13 | {100.0 * 13 / backbone:.4g} | 17 | — |" in md
    assert f"| Task embeddings only | 3 | {100.0 * 3 / backbone:.4g} | 2 | — |" in md
    assert "| VLM (combined) | 50 | 5 | 19 | 0.5 |" in md
    assert f"| Multi-task | 23 | {100.0 * 23 / backbone:.4g} | 18 | — |" in md
    assert "| Adapters | — | — | 0.625 |" in md
    with open(os.path.join(results, "val_loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from engines.report import read_curves
    assert read_curves(runs, ["mt", "nlg"]) == {
        "mt": {"GPT-2 fine-tune": [(1, 3.0), (2, 2.5)], "Adapters + distillation": [(1, 3.5)],
               "Multi-task": [(1, 4.0)]},
        "nlg": {"Multi-task": [(1, 2.0)]}}


def test_report_without_results_is_one_line_error(tmp_path):
    result = run_script("-m", "engines.report", str(tmp_path), "--runs", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {tmp_path}: no <task>_metrics.json in any of "
                                     "GPT2_result, adapter_result, adapter_gold_result, emb_only_result, "
                                     "VLM_result, multitask_result")
    result = run_script("-m", "engines.report", str(tmp_path), "--tasks", "mt,chat")
    assert result.returncode == 2
    assert "--tasks: unknown task 'chat'" in result.stderr


# ---------------------------------------------------------------- the smoke pipeline, for real

# The five-task smoke run takes about 5 minutes on a loaded 2-core machine, too long for this
# file's budget; mt alone (distilled) goes through every stage.
SMOKE_TASKS = "mt"


def test_smoke_run_completes_and_writes_the_summary(tmp_path):
    out = tmp_path / "smoke"
    result = run_sh("--smoke", "--tasks", SMOKE_TASKS, "--out", str(out), python=sys.executable, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tasks = SMOKE_TASKS.split(",")
    with open(out / "results" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    settings = {(r["task"], r["setting"]) for r in rows}
    assert settings == {(t, s) for t in tasks for s in ("finetune", "adapter", "vlm", "multitask")}
    # every setting's parameter count was found in its checkpoint
    assert {(r["task"], r["setting"]) for r in rows if r["metric"] == "parameters"} == settings
    assert {r["value"] for r in rows
            if r["metric"] == "extra_parameters_pct" and r["setting"] == "finetune"} == {"100.0"}
    summary = (out / "results" / "summary.md").read_text()
    assert all(f"## {t}" in summary for t in tasks)
    assert (out / "results" / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for t in tasks:
        for subdir in ("GPT2_result", "adapter_result", "VLM_result", "multitask_result"):
            assert (out / "results" / subdir / f"{t}_output.txt").is_file()
    assert (out / "runs" / "distilled" / "mt.json").is_file()  # mt's adapters learnt from distilled targets
    assert json.loads((out / "runs" / "mt_adapter" / "training_args.json").read_text())[
        "distillation"] is True
    assert json.loads((out / "runs" / "VLM" / "manifest.json").read_text())["verification"][
        "max_abs_logit_difference"] == {"mt": 0.0}


# --- the methods stage and its comparison (engines/methods_report.py) -----------------------------
def test_methods_stage_trains_every_method_with_the_tasks_one_budget():
    result = run_sh("--dry-run", "--stages", "methods", "--tasks", "mt,nlg", "--methods", "lora,prefix+ln",
                    "--out", "/tmp/m")
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    for task, budget in (("mt", ["8", "4", "8", "0.0005"]), ("nlg", ["8", "4", "10", "0.005"])):
        trains = script_calls(cmds, "train.py", task)
        assert [flag(c, "--method") for c in trains] == ["lora", "prefix+ln"]
        for c, method in zip(trains, ("lora", "prefix+ln")):
            assert [flag(c, f)
                    for f in ("--train_batch_size", "--gradient_accumulation_steps", "--n_epochs")] + \
                [str(float(flag(c, "--lr")))] == budget[:3] + [budget[3]]
            assert flag(c, "--output_dir") == f"/tmp/m/runs/methods/{task}_{method}"
            assert "--distillation" not in c and "--adapter_bottleneck" not in c
        assert [flag(c, "--output_dir") for c in script_calls(cmds, "evaluate.py", task)] == [
            "/tmp/m/results/methods_result/lora", "/tmp/m/results/methods_result/prefix+ln"]
    report = [c for c in cmds if "engines.methods_report" in c]
    assert report == [["/bin/false", "-m", "engines.methods_report", "/tmp/m/results",
                       "--runs", "/tmp/m/runs", "--tasks", "mt,nlg"]]
    assert not [c for c in cmds if "engines.report" in c]  # no summary of stages that did not run
    mini = commands(run_sh("--dry-run", "--mini", "--stages", "methods", "--tasks", "mt",
                           "--methods", "ln").stdout)
    assert flag(script_calls(mini, "train.py", "mt")[0], "--n_epochs") == "3"
    assert not script_calls(commands(run_sh("--dry-run", "--mini").stdout), "train.py", "mt")[-1].count(
        "--method")


def test_methods_stage_refuses_an_unknown_method():
    result = run_sh("--dry-run", "--stages", "methods", "--methods", "lora,prefix+lorra")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == ("run.sh: --methods: unknown method 'lorra' (choose from adapter,houlsby,"
                                     "parallel,lora,prefix,prompt,ptuning,ln,adapterbias,compacter,krona,unipelt)")


def method_checkpoint(folder, task, keys, val_ppls):
    """A task-modules checkpoint whose tensors are `keys` ({name: element count}) + 3 row values."""
    os.makedirs(folder, exist_ok=True)
    tensors = {key: torch.zeros(n) for key, n in keys.items()}
    tensors[f"task_embeddings.{task}"] = torch.zeros(1, 3)
    save_file(tensors, os.path.join(folder, "adapters.safetensors"))
    with open(os.path.join(folder, "vlm_config.json"), "w") as f:
        json.dump({"format": "vlm", "mode": "adapter", "tasks": {task: {}},
                   "gpt2_config": dict(SMALL, vocab_size=GPT2_VOCAB_SIZE + 30)}, f)
    write_jsonl(os.path.join(folder, "metrics.jsonl"),
                [{"epoch": i + 1, "val_nll": 1.0, "val_ppl": p} for i, p in enumerate(val_ppls)])


def test_methods_report_table_csv_and_plot(fake_tree):
    results, runs = fake_tree
    write_metrics(results, "methods_result/lora", "mt", {"bleu": 12.5, "rouge1": 0.25})
    write_metrics(results, "methods_result/prefix+ln", "mt", {"bleu": 7.0})
    write_metrics(results, "methods_result/adapter", "mt", {"bleu": 19.0})
    method_checkpoint(f"{runs}/methods/mt_lora", "mt",
                      {"methods.mt.lora.0.q.a": 8, "methods.mt.lora.0.q.b": 4}, [9.0, 8.0])
    method_checkpoint(f"{runs}/methods/mt_prefix+ln", "mt",
                      {"methods.mt.prefix.keys": 6, "methods.mt.ln.0.ln_1.weight": 5}, [7.5])
    method_checkpoint(f"{runs}/methods/mt_adapter", "mt", {"adapters.mt.0.project_down.weight": 20}, [6.0])
    write_jsonl(f"{runs}/mt_full/metrics.jsonl", [{"epoch": 1, "val_nll": 3.0, "val_ppl": 20.1}])
    result = run_script("-m", "engines.methods_report", results, "--runs", runs, "--tasks", "mt,nlg")
    assert result.returncode == 0, result.stderr
    backbone = small_backbone_parameters()
    with open(os.path.join(results, "methods.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["task", "method", "parameters", "extra_parameters_pct", "val_ppl", "bleu", "rouge1"],
        ["mt", "fine-tune", "33", "100.0", "20.1", "20.5", "0.25"],  # the finetune stage's run, as reference
        ["mt", "adapter", "23", repr(100.0 * 23 / backbone), "6.0", "19.0", ""],  # registry order
        ["mt", "lora", "15", repr(100.0 * 15 / backbone), "8.0", "12.5", "0.25"],  # the last epoch's ppl
        ["mt", "prefix+ln", "14", repr(100.0 * 14 / backbone), "7.5", "7.0", ""]]  # composed methods last
    with open(os.path.join(results, "methods.md")) as f:
        table = f.read()
    assert "| lora | 15 | " + f"{100.0 * 15 / backbone:.4g}" + " | 8 | 12.5 | 0.25 |" in table
    assert "## nlg" not in table  # no method ran on nlg
    with open(os.path.join(results, "methods.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "wrote " in result.stdout


def test_methods_report_without_method_results_is_one_error_line(fake_tree):
    results, runs = fake_tree
    result = run_script("-m", "engines.methods_report", results, "--runs", runs, "--tasks", "mt")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {results}/methods_result: "
                                     "no <method>/<task>_metrics.json for tasks mt")
