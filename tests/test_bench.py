"""bench/: the original methods used as baselines, and one quick run of the whole suite.

Speed targets are never asserted here (they live in bench/results.json); what is asserted is
what must hold exactly: the baselines produce the same tokens as ours, the report's arithmetic."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_script, tiny_gpt2

from bench.baseline import decode_original
from bench.run import LIVE_BYTES_MEMORY
from engines.generate import DecodingOptions, generate_batch
from engines.specs import adapter_specs
from models.vlm import VersatileLM, add_special_token_rows
from tasks.table import TASKS
from utils.data import IGNORE_INDEX, collate
from utils.vocab import PAD_ID

SAMPLES = os.path.join(REPO, "data", "samples")


def sample_prompts(tokenizer, name, limit):
    task = TASKS[name]
    records = task.load_data(os.path.join(SAMPLES, f"{name}.json"), tokenizer, [task.test_split])
    return task.dataset_prompts(records[task.test_split], task.max_history, tokenizer, task.task_id)[:limit]


def test_original_decoding_gives_our_batched_cached_tokens(tokenizer):
    gpt2 = tiny_gpt2(seed=4)
    add_special_token_rows(gpt2)
    model = VersatileLM(gpt2, adapter_specs({"nlg": 8, "mt": 8})).eval()
    prompts = sample_prompts(tokenizer, "nlg", 5) + sample_prompts(tokenizer, "mt", 4)
    for options in (DecodingOptions(max_length=12, no_sample=True),
                    DecodingOptions(max_length=9, min_length=9, no_sample=True)):
        ours = generate_batch(model, prompts, options)
        original = [decode_original(model, p, options.max_length, options.min_length) for p in prompts]
        assert ours == original
        if options.min_length == options.max_length:  # stop tokens masked: every row runs to the end
            assert all(len(o) == options.max_length for o in original)


def test_original_padding_pads_every_row_to_the_given_width():
    examples = [{"input_ids": [1, 2, 3], "token_type_ids": [4, 4, 4], "labels": [-100, 2, 3]},
                {"input_ids": [5], "token_type_ids": [6], "labels": [5]}]
    batch = collate(examples, task_id=2, width=5)
    assert batch["input_ids"].tolist() == [[1, 2, 3, PAD_ID, PAD_ID], [5, PAD_ID, PAD_ID, PAD_ID, PAD_ID]]
    assert batch["labels"][1].tolist() == [5] + [IGNORE_INDEX] * 4
    assert batch["task_ids"].tolist() == [2, 2]


def test_quick_run_writes_every_section_and_a_consistent_report(tmp_path, tokenizer):
    sections = ["decoding", "mixed", "adapter_overhead", "training", "padding", "end_to_end"]  # 7, 8: below
    done = run_script("bench/run.py", "--size", "tiny", "--quick", "--sections", *sections, "--output_dir",
                      str(tmp_path), timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["results"]) == {"decoding", "mixed", "adapter_overhead", "training", "padding",
                                      "end_to_end"}
    assert {"cpu", "cpu_count", "torch", "transformers", "device"} <= set(report["machine"])
    # One entry per target, each judged by its own bound.
    targets = report["targets"]
    assert len(targets) == 9
    for t in targets:
        assert set(t) == {"name", "value", "target", "met"}
        op, bound = re.fullmatch(r"(>=|<=) ([0-9.]+)", t["target"]).groups()
        assert t["met"] == (t["value"] >= float(bound) if op == ">=" else t["value"] <= float(bound))
    results = report["results"]
    # The original decoding reproduces ours token for token, in the benchmark and through evaluate.py.
    assert results["decoding"]["outputs_equal"] == results["decoding"]["outputs_compared"] == 4
    assert results["end_to_end"]["outputs_equal"] == results["end_to_end"]["outputs_compared"] == 4
    assert results["end_to_end"]["mrs"] == 200 and results["decoding"]["ours_tokens"] > 0
    # The speedup is the fastest round of ours over the fastest round of the original decoding.
    decoding = results["decoding"]
    fastest = {name: max(r["tokens"] / r["seconds"] for r in decoding[f"{name}_rounds"])
               for name in ("ours", "baseline")}
    assert len(decoding["ours_rounds"]) == len(decoding["baseline_rounds"]) == 2
    assert sum(r["tokens"] for r in decoding["baseline_rounds"]) == decoding["baseline_tokens"]
    assert decoding["speedup"] == pytest.approx(fastest["ours"] / fastest["baseline"], rel=1e-12)
    # Padding shares recomputed here for one task: the original pads everything to the longest.
    task = TASKS["nlg"]
    records = task.load_data(os.path.join(SAMPLES, "nlg.json"), tokenizer, ["train"])["train"]
    lengths = [len(e["input_ids"]) for e in task.training_examples(records, task.max_history)]
    nlg = results["padding"]["tasks"]["nlg"]
    assert nlg["examples"] == len(lengths) and nlg["real_tokens"] == sum(lengths)
    assert abs(nlg["original_share"] - sum(lengths) / (len(lengths) * max(lengths))) < 1e-12
    for p in results["padding"]["tasks"].values():
        assert p["original_share"] <= p["ours_share"] <= 1.0  # a batch's longest is at most the split's
    training = results["training"]["runs"]
    assert training["full"]["trainable_parameters"] > 10 * training["adapter"]["trainable_parameters"]
    assert all(run["peak_bytes"] >= run["loaded_bytes"] > 0 for run in training.values())
    # On CPU the peak is that of one more process whose allocator unmaps freed tensors (live bytes);
    # the timing runs' own default-allocator peaks are kept beside it.
    assert all(run["memory"] == LIVE_BYTES_MEMORY and len(run["timing_runs_peak_bytes"]) == 1
               for run in training.values())
    assert results["training"]["peak_memory_ratio"] == (training["adapter"]["peak_bytes"]
                                                        / training["full"]["peak_bytes"])
    table = (tmp_path / "results.md").read_text()
    assert all(t["name"] in table for t in targets) and "## 6. evaluate.py end to end" in table


def test_a_run_cut_short_keeps_the_sections_it_finished(tmp_path):
    """The report is rewritten whole after every section: a run killed in its second section
    leaves the first one's results.json and results.md (a GPU lease can end mid-run)."""
    env = dict(os.environ, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen([sys.executable, "bench/run.py", "--size", "tiny", "--quick", "--sections",
                                "padding", "decoding", "--output_dir", str(tmp_path)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while (not (tmp_path / "results.md").exists() and process.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before any report was written"
    finally:
        process.kill()
        process.wait()
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["sections"] == list(report["results"]) == ["padding"]
    assert report["requested_sections"] == ["padding", "decoding"]
    assert [t["name"] for t in report["targets"]] == [
        "padding: real-token share of our batches (lowest task)"]
    table = (tmp_path / "results.md").read_text()
    assert "Sections finished: padding (1 of 2 asked for" in table and "## 5. Padding" in table
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]  # no temp files left


def test_bad_flags_are_one_line_errors(tmp_path):
    for flags, message in ((["--dtype", "bfloat16"], "half precision is for --device cuda"),
                           (["--device", "tpu"], "use cpu, cuda or cuda:N"),
                           (["--size", "huge"], "invalid choice")):
        done = run_script("bench/run.py", *flags, "--output_dir", str(tmp_path))
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not os.listdir(tmp_path)


def test_task_rows_leave_no_table_gradient():
    """Section 4's memory saving: in adapter mode the tied table gets no gradient at all."""
    gpt2 = tiny_gpt2()
    add_special_token_rows(gpt2)
    model = VersatileLM(gpt2, adapter_specs({"mt": 8}))
    model.mark_trainable("adapter", "mt")
    ids = torch.randint(0, 50287, (2, 7))
    model(ids, token_type_ids=ids, task_ids=TASKS["mt"].task_id, labels=ids).loss.backward()
    assert gpt2.transformer.wte.weight.grad is None
    assert model.task_rows.rows["mt"].grad.shape == (len(TASKS["mt"].special_tokens), 64)


def test_method_sections_report_every_method_and_equal_mixed_outputs(tmp_path):
    done = run_script("bench/run.py", "--size", "tiny", "--quick", "--sections", "methods", "mixed_methods",
                      "--methods", "lora,prefix+ln", "--output_dir", str(tmp_path), timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "results.json").read_text())
    methods = report["results"]["methods"]
    assert list(methods["methods"]) == ["lora", "prefix+ln"] and methods["memory"] == LIVE_BYTES_MEMORY
    d, layers = 128, 2  # the tiny shape
    lora = methods["methods"]["lora"]
    # q and v, r 4
    assert lora["trainable_parameters"] == lora["saved_parameters"] == layers * 2 * 4 * (d + d)
    prefix = methods["methods"]["prefix+ln"]
    # trained through the reparameterization MLP, saved as plain prefixes (10 keys and values per layer)
    # + LN gains
    assert (prefix["saved_parameters"] == layers * 2 * 10 * d + (2 * layers + 1) * 2 * d
            < prefix["trainable_parameters"])
    for m in methods["methods"].values():
        assert m["extra_pct"] == pytest.approx(100 * m["saved_parameters"] / methods["backbone_parameters"])
        assert m["step_time_ratio"] > 0 and 0 < m["peak_memory_ratio"] < 1.5
        for batch in (1, 8):  # each method's decoding against plain GPT-2 timed in the same rounds
            assert m[f"decoding_overhead_batch{batch}"] == pytest.approx(
                m[f"decoding_seconds_batch{batch}"] / m[f"plain_decoding_seconds_batch{batch}"] - 1)
        # each method's step time against the full fine-tuning process run beside it
        assert m["step_time_ratio"] == pytest.approx(m["median_step_seconds"] / m["full_median_step_seconds"])
    assert methods["full_median_step_seconds"] == [m["full_median_step_seconds"]
                                                   for m in methods["methods"].values()]
    mixed = report["results"]["mixed_methods"]
    # 6 methods x 8 rows, each as in its own batch
    assert mixed["outputs_equal"] == mixed["outputs_compared"] == 48
    names = [t["name"] for t in report["targets"]]
    assert names == ["mixed methods: throughput, one 6x8 batch of six methods / 6 batches of 8",
                     "mixed methods: outputs equal to each method's own batch (share)"]
    table = (tmp_path / "results.md").read_text()
    assert "| prefix+ln |" in table and "## 8. One batch, six methods" in table
