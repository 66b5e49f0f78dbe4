"""evaluate_vlm.py on a combined (multi-task adapter) checkpoint: each task decodes as evaluate.py does
on that task's own checkpoint, `--task all` decodes every task in mixed batches with the same outputs,
and bad flags give one error line."""
import io
import json
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, run_script

import evaluate
import evaluate_vlm
from engines.specs import adapter_specs
from models.checkpoint import save_checkpoint
from models.vlm import VersatileLM
from tasks.table import TASKS

BOTTLENECKS = {"mt": 8, "nlg": 4, "qa": 6, "dialogue": 5}
DATASETS = {
    "mt": {"train": [{"src": "a cat sleeps .", "tgt": "eine katze schläft ."}],
           "test": [{"src": "a dog runs in the park .", "tgt": "ein hund rennt im park ."},
                    {"src": "two men are talking .", "tgt": "zwei männer reden ."},
                    {"src": "a woman reads a book .", "tgt": "eine frau liest ein buch ."}]},
    "nlg": {"train": [{"src": {"name": "The Vaults", "eatType": "pub"}, "tgt": "The Vaults is a pub."}],
            "test": [{"src": {"name": "The Vaults", "eatType": "pub"}, "tgt": "The Vaults is a pub."},
                     {"src": {"name": "The Vaults", "eatType": "pub"},
                      "tgt": "There is a pub called The Vaults."},
                     {"src": {"name": "Alimentum", "area": "city centre", "customer rating": "low"},
                      "tgt": "Alimentum is in the city centre and rated low."}]},
    "qa": {"valid": [{"id": "story1", "document": ["The cat sat on the mat. It was red."], "utterances": [
        {"history": ["What sat?"], "candidates": ["the cat"], "turn_id": 1},
        {"history": ["What sat?", "the cat", "Where?"], "candidates": ["on the mat"], "turn_id": 2}]}]},
    "dialogue": {"valid": [{"personality": ["i like dogs .", "i am a cook ."], "utterances": [
        {"history": ["hi !"], "candidates": ["bad", "hello , i like dogs ."]},
        {"history": ["hi !", "hello , i like dogs .", "me too !"], "candidates": ["great ."]}]}]},
}
DECODING = ["--device", "cpu", "--max_length", "12"]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory, tiny_base, tokenizer):
    """A four-task adapter checkpoint, the same weights saved as four single-task checkpoints,
    and the datasets; adapters and each task's own rows perturbed so every task decodes differently."""
    root = tmp_path_factory.mktemp("vlm")
    torch.manual_seed(1)
    model = VersatileLM.from_pretrained(tiny_base, adapter_specs(BOTTLENECKS))
    wte = model.gpt2.get_input_embeddings().weight
    with torch.no_grad():
        for task in BOTTLENECKS:
            for p in model.tasks[task].methods["adapter"].parameters():
                p.add_(torch.randn_like(p) * 0.5)
            rows = TASKS[task].token_ids()
            wte[rows] += torch.randn(len(rows), wte.shape[1]) * 0.02
    save_checkpoint(model, tokenizer, str(root / "VLM"), "adapter", list(BOTTLENECKS), tiny_base)
    single = {}
    for task in BOTTLENECKS:
        single[task] = str(root / f"single_{task}")
        save_checkpoint(model, tokenizer, single[task], "adapter", [task], tiny_base)
    datasets = {}
    for task, content in DATASETS.items():
        datasets[task] = str(root / f"{task}.json")
        with open(datasets[task], "w", encoding="utf-8") as f:
            json.dump(content, f)
    return SimpleNamespace(path=str(root / "VLM"), single=single, datasets=datasets,
                           cache=str(root / "cache"))


def read_files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def task_files(files, task):
    return {name: data for name, data in files.items() if name.startswith(f"{task}_")}


def common_flags(vlm, sampling=False):
    flags = ["--dataset_cache", vlm.cache, *DECODING]
    # Sampling is slower on CPU (50k-way multinomials): fewer steps.
    return flags + (["--max_length", "5"] if sampling else ["--no_sample"])


@pytest.fixture(scope="module")
def single_task_run(vlm, tmp_path_factory):
    """evaluate_vlm.py --task TASK on the combined checkpoint (in-process, run once per setting):
    -> the folder of its files."""
    runs = {}

    def run(task, sampling=False):
        if (task, sampling) not in runs:
            out = tmp_path_factory.mktemp(f"vlm_{task}_{'sampled' if sampling else 'greedy'}")
            evaluate_vlm.main(["--model_checkpoint", vlm.path, "--task", task,
                               "--dataset_path", vlm.datasets[task], "--output_dir", str(out),
                               *common_flags(vlm, sampling)])
            runs[task, sampling] = out
        return runs[task, sampling]
    return run


@pytest.mark.parametrize("task", list(BOTTLENECKS))
def test_one_task_equals_evaluate_py_on_its_own_checkpoint(task, vlm, single_task_run, tmp_path):
    evaluate.main(["--model_checkpoint", vlm.single[task], "--task", task,
                   "--dataset_path", vlm.datasets[task], "--output_dir", str(tmp_path / "single"),
                   *common_flags(vlm)])
    expected, got = read_files(tmp_path / "single"), read_files(single_task_run(task))
    assert sorted(got) == sorted(expected) and f"{task}_output.txt" in got
    assert "summary.json" not in got  # only --task all writes a summary
    metrics = f"{task}_metrics.json"
    for name in expected:
        if name != metrics:
            assert got[name] == expected[name], name
    expected_metrics, got_metrics = json.loads(expected[metrics]), json.loads(got[metrics])
    # Dialogue's perplexity too: the other tasks' trained rows are out of its softmax, as in decoding.
    assert got_metrics == expected_metrics
    assert task != "dialogue" or got_metrics["ppl"] > 1
    if task != "qa":  # the decoded text is not all empty: the comparison compares something
        assert any(line.strip() for line in got[f"{task}_output.txt"].decode().splitlines())


def test_the_authors_command_line_writes_to_results_vlm_result(vlm, single_task_run, tmp_path):
    result = run_script(os.path.join(REPO, "evaluate_vlm.py"), "--task", "mt", "--no_sample",
                        "--model_checkpoint", vlm.path, "--dataset_path", vlm.datasets["mt"],
                        *common_flags(vlm), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("task=mt  examples=3  bleu=")
    assert read_files(tmp_path / "results" / "VLM_result") == read_files(single_task_run("mt"))


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_all_tasks_decode_in_mixed_batches_with_single_task_outputs(sampling, vlm, single_task_run, tmp_path,
                                                                     monkeypatch, capsys):
    single = {}
    for task in BOTTLENECKS:
        single.update(read_files(single_task_run(task, sampling)))
    capsys.readouterr()

    # Record the tasks of the rows of every forward pass of the `all` run.
    tasks_per_call, forward = [], VersatileLM.forward

    def spy(self, input_ids, *args, task_ids=None, **kwargs):
        tasks_per_call.append(frozenset(torch.as_tensor(task_ids).tolist()))
        return forward(self, input_ids, *args, task_ids=task_ids, **kwargs)

    monkeypatch.setattr(VersatileLM, "forward", spy)
    # A batch size below the 9 prompts: batches are cut across task boundaries as well.
    evaluate_vlm.main(["--model_checkpoint", vlm.path, "--task", "all", "--batch_size", "4",
                       "--output_dir", str(tmp_path / "all"), *common_flags(vlm, sampling),
                       "--dataset_paths", *(f"{task}={path}" for task, path in vlm.datasets.items())])
    monkeypatch.undo()

    assert any(len(call) >= 2 for call in tasks_per_call)
    assert set().union(*tasks_per_call) == {TASKS[t].task_id for t in BOTTLENECKS}
    combined = read_files(tmp_path / "all")
    for task in BOTTLENECKS:
        assert task_files(combined, task) == task_files(single, task), task
    assert sorted(combined) == sorted(list(single) + ["summary.json", "summary.md"])

    summary = json.loads(combined["summary.json"])
    assert list(summary["tasks"]) == list(BOTTLENECKS)  # the checkpoint's order
    for task in BOTTLENECKS:
        assert summary["tasks"][task] == json.loads(combined[f"{task}_metrics.json"])
    assert summary["decoding"]["no_sample"] is (not sampling)
    table = combined["summary.md"].decode().splitlines()
    assert table[:2] == ["| task | examples | metrics |", "|---|---:|---|"]
    assert [row.split(" | ")[0] for row in table[2:]] == [f"| {task}" for task in BOTTLENECKS]
    lines = capsys.readouterr().out.splitlines()
    assert ([line.split()[0] for line in lines if line.startswith("task=")]
            == [f"task={t}" for t in BOTTLENECKS])


def test_own_input_decodes_as_evaluate_py(vlm, monkeypatch, capsys):
    lines = '{"src": "a dog runs ."}\n"two men are talking ."\n'
    outputs = []
    for main, path in ((evaluate.main, vlm.single["mt"]), (evaluate_vlm.main, vlm.path)):
        monkeypatch.setattr("sys.stdin", io.StringIO(lines))
        main(["--model_checkpoint", path, "--task", "mt", "--no_sample", *DECODING, "--input", "-"])
        outputs.append(capsys.readouterr().out)
    assert outputs[1] == outputs[0]
    rows = [json.loads(row) for row in outputs[0].splitlines()]
    assert [row["input"] for row in rows] == [{"src": "a dog runs ."}, "two men are talking ."]
    assert any(row["output"].strip() for row in rows)


def assert_one_error_line(stderr, *messages):
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(m in lines[0] for m in messages), stderr


def test_bad_dataset_paths_on_the_command_line_exit_2_with_one_error_line(vlm):
    result = run_script("evaluate_vlm.py", "--model_checkpoint", vlm.path, "--task", "mt",
                        "--dataset_paths", "mt:foo", *DECODING)
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "--dataset_paths mt:foo: expected TASK=PATH")


@pytest.mark.parametrize("flags, message", [
    (["--task", "summarization"],
     ("--task summarization: ", "holds mt, nlg, qa, dialogue, not summarization")),
    (["--task", "mt", "--dataset_paths", "mt:foo"], "--dataset_paths mt:foo: expected TASK=PATH"),
    (["--task", "all", "--dataset_paths", "poetry=x.json"],
     "--dataset_paths poetry=x.json: unknown task 'poetry'"),
    (["--task", "poetry"], "--task: unknown task 'poetry'"),
    (["--task", "all", "--input", "hello"], "--input decodes one task"),
    (["--task", "all", "--dataset_path", "x.json"], "--dataset_path names one task's file"),
    (["--task", "mt", "--dataset_path", "a.json", "--dataset_paths", "mt=b.json"], "both give the mt file"),
    (["--task", "mt", "--dataset_paths", "summarization=x.json"],
     "holds mt, nlg, qa, dialogue, not summarization"),
    (["--task", "mt", "--dataset_paths", "mt=a.json", "mt=b.json"], "mt is given twice"),
    (["--task", "all", "--dataset_paths", "mt=/nonexistent.json"],
     "/nonexistent.json: dataset file not found"),
])
def test_bad_flags_exit_2_with_one_error_line(flags, message, vlm, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_vlm.main(["--model_checkpoint", vlm.path, *flags, *DECODING])
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, *([message] if isinstance(message, str) else message))


def test_plain_gpt2_or_missing_checkpoint_is_refused(tiny_base, tmp_path, capsys):
    for path, message in ((tiny_base, "no vlm_config.json: not a VLM checkpoint"),
                          (str(tmp_path / "nothing"), "not found")):
        with pytest.raises(SystemExit) as exit_info:
            evaluate_vlm.main(["--model_checkpoint", path, "--task", "mt", *DECODING])
        assert exit_info.value.code == 2
        assert_one_error_line(capsys.readouterr().err, f"--model_checkpoint {path}: {message}")
