"""train_vlm.py and engines/multitask.py: multi-task training on several tasks' data at once.
The temperature batch sampler, the adapter run (frozen backbone, both tasks' adapters and rows
trained, per-task validation), --no_adapter full fine-tuning, user errors and torchrun."""
import json
import math
import os
import subprocess
import sys
from collections import Counter
from datetime import datetime

import pytest
import torch
from conftest import (
    EVERY_METHOD_SPECS,
    REPO,
    TINY_METHOD_OPTIONS,
    option_flags,
    popen_script,
    sigkill_after_first_checkpoint,
)
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import train_vlm
from engines import multitask, settings
from engines.sampling import MultiTaskBatchSampler
from engines.specs import adapter_specs, builtin_spec
from engines.training import backbone_parameter_count
from models.checkpoint import load_checkpoint
from models.vlm import VersatileLM, backbone_fingerprint
from tasks.table import TASKS
from utils.data import IGNORE_INDEX, collate, load_tokenizer, with_virtual_tokens
from utils.vocab import GPT2_VOCAB_SIZE

NLG_NAMES = ["The Vaults", "The Eagle", "Alimentum", "Zizzi", "Cotto", "Aromi", "Wildwood", "Strada"]
MT_PAIRS = [("a dog runs .", "ein hund rennt ."), ("a man sleeps .", "ein mann schläft ."),
            ("two cats eat fish .", "zwei katzen essen fisch ."), ("the sun shines .", "die sonne scheint ."),
            ("children play outside .", "kinder spielen draußen ."), ("a woman reads .", "eine frau liest .")]


# --- helpers (vlm_ prefixed: conftest.py is shared) ----------------------------------------------
def vlm_nlg(names):
    kinds = ("pub", "restaurant")
    return [{"src": {"name": n, "eatType": kinds[i % 2]}, "tgt": f"{n} is a {kinds[i % 2]}."}
            for i, n in enumerate(names)]


@pytest.fixture
def vlm_data(tmp_path):
    """{task: path}: nlg 6 train / 2 valid records, mt 4 train / 2 test (mt validates on test)."""
    nlg, mt = tmp_path / "nlg.json", tmp_path / "mt.json"
    nlg.write_text(json.dumps({"train": vlm_nlg(NLG_NAMES[:6]), "valid": vlm_nlg(NLG_NAMES[6:])}),
                   encoding="utf-8")
    pairs = [{"src": s, "tgt": t} for s, t in MT_PAIRS]
    mt.write_text(json.dumps({"train": pairs[:4], "test": pairs[4:]}, ensure_ascii=False), encoding="utf-8")
    return {"mt": str(mt), "nlg": str(nlg)}


def vlm_argv(tmp_path, data, base, *extra, out="out"):
    return ["--tasks", "mt", "nlg", "--dataset_paths", *(f"{t}={p}" for t, p in data.items()),
            "--dataset_cache", str(tmp_path / "cache"), "--model_checkpoint", base, "--device", "cpu",
            "--output_dir", str(tmp_path / out), "--train_batch_size", "2", "--valid_batch_size", "2",
            "--gradient_accumulation_steps", "1", *extra]


def vlm_run_cli(*args, module=None):
    env = dict(os.environ, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    command = [sys.executable, *(["-m", module] if module else []), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def vlm_metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def vlm_valid_examples(task_name, path):
    task = TASKS[task_name]
    split = task.splits[1]
    records = task.load_data(path, load_tokenizer(), splits=[split])[split]
    return task.training_examples(records, task.max_history, max_positions=512)


def vlm_exact_nll(model, examples, task_id, task_name=None):
    """Token-level mean NLL one example at a time (no padding, no batching, no other task), led
    by the task's virtual tokens when its method has them."""
    n_virtual = model.tasks[task_name].num_virtual_tokens if task_name in model.tasks else 0
    examples = [with_virtual_tokens(e, n_virtual) for e in examples] if n_virtual else examples
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for e in examples:
            virtual = torch.tensor([e["virtual_ids"]]) if n_virtual else None
            loss = model(torch.tensor([e["input_ids"]]), token_type_ids=torch.tensor([e["token_type_ids"]]),
                         task_ids=task_id, labels=torch.tensor([e["labels"]]),
                         virtual_ids=virtual).loss.item()
            n = sum(1 for label in e["labels"][1:] if label != IGNORE_INDEX)
            total, count = total + loss * n, count + n
    return total / count


def vlm_check_per_task_validation(records, model, data, task_ids):
    """Every record has both tasks' nll/ppl; the last equals the saved model's exact per-task NLL."""
    for r in records:
        assert set(r["val"]) == {"mt", "nlg"}
        for m in r["val"].values():
            assert m["ppl"] == pytest.approx(math.exp(m["nll"]), rel=1e-12)
        assert r["val_nll_mean"] == pytest.approx((r["val"]["mt"]["nll"] + r["val"]["nlg"]["nll"]) / 2,
                                                  rel=1e-12)
    for name in ("mt", "nlg"):
        nll = vlm_exact_nll(model, vlm_valid_examples(name, data[name]), task_ids[name], name)
        assert records[-1]["val"][name]["nll"] == pytest.approx(nll, rel=1e-5), name


def vlm_trainable_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("trainable parameters:")]
    assert len(lines) == 1, stdout
    return lines[0]


def vlm_batches(sampler, epoch=1):
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    return batches


# --- 1. the sampler ------------------------------------------------------------------------------
def test_temperature_one_draws_every_example_once_per_epoch():
    lengths = {"mt": [5, 9, 3, 7, 7, 2, 8], "nlg": [4, 4, 6], "qa": [10] * 12}
    sampler = MultiTaskBatchSampler(lengths, batch_size=3, temperature=1.0, seed=7)
    assert sampler.counts == {"mt": 7, "nlg": 3, "qa": 12}
    orders = []
    for epoch in (1, 2):
        batches = vlm_batches(sampler, epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(22))
        orders.append(flat)
    assert orders[0] != orders[1]  # reshuffled each epoch (seed + epoch) ...
    again = MultiTaskBatchSampler(lengths, batch_size=3, temperature=1.0, seed=7)
    assert [i for b in vlm_batches(again, 2) for i in b] == orders[1]  # ... and reproducible
    assert [sampler.task_of(i) for i in (0, 6, 7, 9, 10, 21)] == ["mt", "mt", "nlg", "nlg", "qa", "qa"]


def test_temperature_flattens_task_shares_toward_uniform():
    lengths = {"big": [4] * 1000, "small": [4] * 10}
    small_counts = {}
    for temperature in (1.0, 2.0, 5.0, 1000.0, math.inf):
        sampler = MultiTaskBatchSampler(lengths, batch_size=16, temperature=temperature, seed=0)
        drawn = Counter(sampler.task_of(i) for b in vlm_batches(sampler) for i in b)
        assert drawn == Counter(sampler.counts) and sum(drawn.values()) == 1010  # the epoch keeps its size
        small_counts[temperature] = drawn["small"]
    # p_small = 10^(1/T) / (1000^(1/T) + 10^(1/T)) of the 1010 draws (two tasks: largest remainder = rounding)
    for temperature in (1.0, 2.0, 5.0, 1000.0):
        share = 10 ** (1 / temperature) / (1000 ** (1 / temperature) + 10 ** (1 / temperature))
        assert small_counts[temperature] == round(1010 * share), temperature
    assert (small_counts[1.0], small_counts[2.0]) == (10, 92)
    values = list(small_counts.values())
    assert values == sorted(values) and len(set(values)) == len(values)  # rises with T ...
    assert abs(small_counts[1000.0] - 505) <= 2 and small_counts[math.inf] == 505  # ... to uniform

    # Uniform: the 10 small examples repeat as evenly as possible (50 or 51 times each);
    # the big task is subsampled without replacement (505 distinct examples).
    sampler = MultiTaskBatchSampler(lengths, batch_size=16, temperature=math.inf, seed=3)
    uses = Counter(i for b in vlm_batches(sampler) for i in b)
    assert sorted(uses[i] for i in range(1000, 1010)) == [50] * 5 + [51] * 5
    big = [i for i in uses if i < 1000]
    assert len(big) == 505 and all(uses[i] == 1 for i in big)


def test_mixed_batches_hold_several_tasks_and_collate_per_row_task_ids():
    lengths = {"mt": [6] * 20, "nlg": [6] * 20}  # equal lengths: length grouping does not separate tasks
    sampler = MultiTaskBatchSampler(lengths, batch_size=8, mix_tasks=True, seed=1)
    batches = vlm_batches(sampler)
    assert any(len({sampler.task_of(i) for i in b}) >= 2 for b in batches)
    assert len(batches) == 5

    examples = [{"input_ids": [1] * 6, "token_type_ids": [1] * 6, "labels": [1] * 6,
                 "task_id": TASKS["mt" if i < 20 else "nlg"].task_id} for i in range(40)]
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=lambda b: collate(b, task_id=None))
    for batch, indices in zip(loader, batches):
        assert batch["task_ids"].tolist() == [TASKS[sampler.task_of(i)].task_id for i in indices]


def test_single_task_batches_never_mix():
    lengths = {"mt": [3, 8, 5, 6] * 9 + [4], "nlg": [5] * 5}  # 37 and 5 examples
    sampler = MultiTaskBatchSampler(lengths, batch_size=8, mix_tasks=False, seed=2)
    assert len(sampler) == 5 + 1
    for epoch in (1, 2, 3):
        batches = vlm_batches(sampler, epoch)
        assert all(len({sampler.task_of(i) for i in b}) == 1 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(42))
    upsampled = MultiTaskBatchSampler(lengths, batch_size=8, mix_tasks=False, temperature=10.0, seed=2)
    assert all(len({upsampled.task_of(i) for i in b}) == 1 for b in vlm_batches(upsampled))


@pytest.mark.parametrize("mix", [True, False])
def test_ranks_take_disjoint_equal_shares(mix):
    lengths = {"mt": list(range(2, 25)), "nlg": [7] * 10}  # 33 examples, T=1: each index drawn once
    whole = MultiTaskBatchSampler(lengths, batch_size=4, mix_tasks=mix, seed=5)
    ranks = [MultiTaskBatchSampler(lengths, batch_size=4, mix_tasks=mix, seed=5, num_replicas=2, rank=r)
             for r in (0, 1)]
    shares = [vlm_batches(s, 4) for s in ranks]
    all_batches = vlm_batches(whole, 4)
    assert len(shares[0]) == len(shares[1]) == len(all_batches) // 2
    seen = [{i for b in share for i in b} for share in shares]
    assert not seen[0] & seen[1]
    assert shares[0] + shares[1] == all_batches[0::2][:len(shares[0])] + all_batches[1::2][:len(shares[1])]


# --- 2. adapter mode: one CLI run on two tasks ---------------------------------------------------
def test_cli_trains_both_tasks_adapters_on_a_frozen_backbone(tmp_path, tiny_base, vlm_data):
    out = tmp_path / "out"
    result = vlm_run_cli("train_vlm.py", *vlm_argv(tmp_path, vlm_data, tiny_base, "--n_epochs", "2",
                                                   "--lr", "1e-2", "--train_batch_size", "4"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    # the task table's bottlenecks
    base = VersatileLM.from_pretrained(tiny_base, adapter_specs({"mt": 300, "nlg": 10}))
    expected = base.count_trainable("adapter", ["mt", "nlg"])
    assert expected == base.count_trainable("adapter", "mt") + base.count_trainable("adapter", "nlg")
    assert vlm_trainable_line(result.stdout).startswith(f"trainable parameters: {expected:,} (") and \
        f"of the {backbone_parameter_count(base):,}-parameter backbone" in result.stdout

    records = vlm_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["iteration"] for r in records] == [3, 6]  # 10 examples in mixed batches of 4
    for r in records:
        assert f"validation after epoch {r['epoch']}: mt nll {r['val']['mt']['nll']:.4f}" in result.stdout

    model, _, config = load_checkpoint(str(out))
    assert config["mode"] == "adapter"
    assert {t: (e["task_id"], e["methods"]) for t, e in config["tasks"].items()} == \
        {"mt": (2, {"adapter": {"bottleneck": 300}}), "nlg": (4, {"adapter": {"bottleneck": 10}})}
    assert config["training_args"]["tasks"] == ["mt", "nlg"] and config["multitask"]["temperature"] == 1.0
    assert sorted(model.tasks) == ["mt", "nlg"]
    # The fingerprint is taken from the trained model at save time: equal to the untouched base's,
    # every GPT-2 weight and all 50,257 original rows are bit-identical (load_checkpoint checks it too).
    assert config["base_fingerprint"] == backbone_fingerprint(base.gpt2)
    wte, base_wte = model.gpt2.get_input_embeddings().weight, base.gpt2.get_input_embeddings().weight
    for name in ("mt", "nlg"):
        rows = TASKS[name].token_ids()
        for row in rows[:4]:  # bos, eos and the two segment tokens every example uses
            assert not torch.equal(wte[row], base_wte[row]), (name, row)
        for trained, initial in zip(model.tasks[name].methods["adapter"],
                                    base.tasks[name].methods["adapter"]):
            assert not torch.equal(trained.project_up.weight, initial.project_up.weight), name
            assert torch.any(trained.project_up.bias != 0) and not torch.all(trained.ln.weight == 1), name
    vlm_check_per_task_validation(records, model, vlm_data, {t: TASKS[t].task_id for t in ("mt", "nlg")})
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint_epoch1",
                                                                               "checkpoint_epoch2"]


def test_single_task_batches_leave_the_backbone_and_other_rows_bit_identical(tmp_path, tiny_base, vlm_data):
    argv = vlm_argv(tmp_path, vlm_data, tiny_base, "--n_epochs", "1", "--lr", "1e-2", "--no-mix_tasks",
                    "--temperature", "3")
    result = multitask.run_multitask(train_vlm.parse_args(argv))
    assert result.mode == "adapter"
    base = VersatileLM.from_pretrained(tiny_base, adapter_specs({"mt": 300, "nlg": 10}))
    trained, initial = result.model.state_dict(), base.state_dict()
    assert trained.keys() == initial.keys()
    for name, tensor in initial.items():
        if name.startswith("tasks."):  # both tasks' adapters: every tensor of every layer moved
            assert not torch.equal(trained[name], tensor), name
        elif name not in ("gpt2.transformer.wte.weight", "gpt2.lm_head.weight"):
            assert torch.equal(trained[name], tensor), name
    wte, base_wte = trained["gpt2.transformer.wte.weight"], initial["gpt2.transformer.wte.weight"]
    assert torch.equal(wte[:GPT2_VOCAB_SIZE + 1], base_wte[:GPT2_VOCAB_SIZE + 1])  # GPT-2's rows and <pad>
    for name, task in TASKS.items():
        rows = task.token_ids()
        assert torch.equal(wte[rows], base_wte[rows]) == (name not in ("mt", "nlg")), name
    assert result.metrics[-1]["epoch"] == 1 and set(result.metrics[-1]["val"]) == {"mt", "nlg"}


# --- 2b. tasks of different methods in one run -------------------------------------------------
MIXED_METHODS = ["--method", "lora", "nlg=prompt+ln", "--prompt_length", "3", "--lora_r", "2"]


def test_tasks_of_different_methods_train_in_shared_batches(tmp_path, tiny_base, vlm_data, capsys):
    """mt with LoRA and nlg with a 3-token soft prompt + LN-tuning in mixed batches: each task's
    tensors all move, nothing else does, and the validation NLL of each task (its virtual tokens
    in front for nlg) equals its exact one-example-at-a-time NLL."""
    argv = vlm_argv(tmp_path, vlm_data, tiny_base, "--n_epochs", "2", "--lr", "1e-2",
                    "--train_batch_size", "4", *MIXED_METHODS)
    args = train_vlm.parse_args(argv)
    result = multitask.run_multitask(args)
    assert args.methods == {"mt": {"lora": {"r": 2, "alpha": 32.0, "dropout": 0.1, "targets": ["q", "v"]}},
                            "nlg": {"prompt": {"length": 3, "init_seed": 0}, "ln": {}}}
    base = VersatileLM.from_pretrained(tiny_base, [builtin_spec(t, args.methods[t]) for t in ("mt", "nlg")])
    assert vlm_trainable_line(capsys.readouterr().out).startswith(
        f"trainable parameters: {base.count_trainable('adapter', ['mt', 'nlg']):,} (")
    trained, initial = result.model.state_dict(), base.state_dict()
    assert trained.keys() == initial.keys()
    moved = {name for name, tensor in initial.items() if not torch.equal(trained[name], tensor)}
    task_tensors = {name for name in initial if name.startswith("tasks.")}
    assert {n.split(".")[1] for n in task_tensors} == {"mt", "nlg"}
    assert task_tensors <= moved  # every LoRA factor, the prompt and every LayerNorm gain and bias
    assert moved - task_tensors == {"gpt2.transformer.wte.weight", "gpt2.lm_head.weight"}  # the tied table
    wte, base_wte = trained["gpt2.transformer.wte.weight"], initial["gpt2.transformer.wte.weight"]
    assert torch.equal(wte[:GPT2_VOCAB_SIZE + 1], base_wte[:GPT2_VOCAB_SIZE + 1])
    for name, task in TASKS.items():
        rows = task.token_ids()
        assert torch.equal(wte[rows], base_wte[rows]) == (name not in ("mt", "nlg")), name

    out = tmp_path / "out"
    model, _, config = load_checkpoint(str(out))
    assert {t: e["methods"] for t, e in config["tasks"].items()} == args.methods
    assert config["base_fingerprint"] == backbone_fingerprint(base.gpt2)
    vlm_check_per_task_validation(result.metrics, model, vlm_data,
                                  {t: TASKS[t].task_id for t in ("mt", "nlg")})
    assert "_VLM_multitask_mixed_" in settings.default_output_dir(args, "adapter")


# Every registered method in one run: ten composed for mt, p-tuning + UniPELT for nlg; LoRA's
# dropout on. The adapter keeps the task table's bottleneck: train_vlm.py has no --adapter_bottleneck.
EVERY_METHOD = dict(zip(("mt", "nlg"), EVERY_METHOD_SPECS))
EVERY_METHOD_FLAGS = ["--method", *(f"{task}={spec}" for task, spec in EVERY_METHOD.items()),
                      *option_flags({name: options for name, options in TINY_METHOD_OPTIONS.items()
                                     if name != "adapter"})]


def vlm_popen(argv, log):
    return popen_script("train_vlm.py", argv, log)


def test_sigkill_then_resume_gives_the_uninterrupted_runs_weights(tmp_path, tiny_base):
    """Every method, in mixed batches, with LoRA dropout on (the random state matters): a run killed
    after its first epoch checkpoint and resumed ends bit-identical to one that was never stopped."""
    nlg, mt = tmp_path / "nlg.json", tmp_path / "mt.json"
    names = [f"Place{i}" for i in range(40)]
    nlg.write_text(json.dumps({"train": vlm_nlg(names[:36]), "valid": vlm_nlg(names[36:])}), encoding="utf-8")
    pairs = [{"src": f"{s} {i}", "tgt": f"{t} {i}"} for i in range(6) for s, t in MT_PAIRS]
    mt.write_text(json.dumps({"train": pairs[:32], "test": pairs[32:36]}, ensure_ascii=False),
                  encoding="utf-8")
    data = {"mt": str(mt), "nlg": str(nlg)}

    def argv(out):
        return vlm_argv(tmp_path, data, tiny_base, "--n_epochs", "3", "--lr", "1e-2", *EVERY_METHOD_FLAGS,
                        out=out)
    reference = vlm_popen(argv("full"), tmp_path / "full.log")
    victim = vlm_popen(argv("killed"), tmp_path / "killed.log")
    killed = tmp_path / "killed"
    sigkill_after_first_checkpoint(victim, killed, tmp_path / "killed.log", timeout=120)
    assert reference.wait(300) == 0, (tmp_path / "full.log").read_text()[-3000:]
    assert not (killed / "vlm_config.json").exists()  # no final model: it was killed
    state = json.loads((killed / "checkpoint_epoch1" / "training_state.json").read_text())
    assert {task: "+".join(methods) for task, methods in state["settings"]["methods"].items()} == EVERY_METHOD

    resumed = vlm_popen(argv("killed") + ["--resume"], tmp_path / "resumed.log")
    assert resumed.wait(300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert "resuming from" in (tmp_path / "resumed.log").read_text()
    full = tmp_path / "full"
    for name in ("adapters.safetensors", "checkpoint_epoch3/training_state.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(killed / name))
        assert sorted(a) == sorted(b)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    strip = [{k: v for k, v in r.items() if k != "elapsed"} for r in vlm_metrics(full)]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed"} for r in vlm_metrics(killed)]

    # Changing a setting that decides the course of training is refused, naming it.
    changed = vlm_run_cli("train_vlm.py", *argv("killed"), "--resume", "--temperature", "2")
    assert changed.returncode == 2 and "was trained with --temperature 1.0, not 2.0" in changed.stderr


# --- 3. --no_adapter: multi-task full fine-tuning ------------------------------------------------
def test_no_adapter_fine_tunes_gpt2_and_saves_a_full_checkpoint(tmp_path, tiny_base, vlm_data, capsys):
    argv = vlm_argv(tmp_path, vlm_data, tiny_base, "--no_adapter", "--n_epochs", "1", "--lr", "1e-3",
                    "--eval_before_start")
    args = train_vlm.parse_args(argv)
    result = multitask.run_multitask(args)
    assert result.mode == "full" and args.lr == 1e-3 and len(result.model.tasks) == 0
    total = sum(p.numel() for p in result.model.parameters())
    assert vlm_trainable_line(capsys.readouterr().out).startswith(
        f"trainable parameters: {total:,} (100.1% of the ")

    loaded, _, config = load_checkpoint(result.output_dir)
    assert config["mode"] == "full" and len(loaded.tasks) == 0
    # trained on mt and nlg, with no modules of their own: both decode as plain GPT-2 rows (id -1)
    assert {t: (e["task_id"], e["methods"]) for t, e in config["tasks"].items()} == {"mt": (-1, {}),
                                                                                     "nlg": (-1, {})}
    base = VersatileLM.from_pretrained(tiny_base)
    moved = [name for name, tensor in base.gpt2.state_dict().items()
             if not torch.equal(loaded.gpt2.state_dict()[name], tensor)]
    assert "transformer.h.0.attn.c_attn.weight" in moved and "transformer.wte.weight" in moved
    ids = torch.randint(0, 50287, (2, 7))
    with torch.no_grad():
        expected_logits = result.model.eval()(ids, token_type_ids=ids).logits
        assert torch.equal(loaded(ids, token_type_ids=ids).logits, expected_logits)
    records = vlm_metrics(result.output_dir)
    assert [r["epoch"] for r in records] == [0, 1] and records == result.metrics
    # No adapters: every task is validated (and later decoded) as plain GPT-2 rows, task id -1.
    vlm_check_per_task_validation(records, loaded, vlm_data, {"mt": None, "nlg": None})


# --- 4. user errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, expected", [
    (["--tasks", "mt", "poetry"], "--tasks: unknown task 'poetry'"),
    (["--tasks", "mt", "mt"], "--tasks: mt is given twice"),
    (["--tasks"], "--tasks"),
    (["--dataset_paths", "mt"], "--dataset_paths mt: expected TASK=PATH"),
    (["--dataset_paths", "mt="], "--dataset_paths mt=: expected TASK=PATH"),
    (["--dataset_paths", "poetry=x.json"], "unknown task 'poetry'"),
    (["--dataset_paths", "qa=x.json"], "qa is not in --tasks"),
    (["--tasks", "nlg", "--dataset_paths", "nlg=/no/nlg.json"],
     "--dataset_paths nlg=/no/nlg.json: dataset file not found"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "-2"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "hot"], "--temperature"),
    (["--n_epochs", "-1"], "--n_epochs"),
    (["--lr", "0"], "--lr"),
    (["--fp16", "yes"], "--fp16"),
    (["--method", "lora", "prefix"], "--method: lora prefix: give one method for every task"),
    (["--method", "qa=lora"], "--method qa=lora: qa is not in --tasks (mt nlg)"),
    (["--method", "mt=lora", "mt=ln"], "--method mt=ln: mt is given twice"),
    (["--method", "nlg=lora+lora"], "--method nlg=lora+lora: a method is named twice"),
    (["--method", "nlg=poetry"],
     "--method nlg=poetry: unknown method 'poetry' (choose from adapter, houlsby"),
    (["--method", "lora", "--prefix_length", "3"],
     "--prefix_length is an option of prefix, which no task's --method uses"),
    (["--no_adapter", "--method", "lora"],
     "--no_adapter fine-tunes all of GPT-2 with no per-task modules; drop --method lora"),
    (["--method", "mt=lora", "--lora_r", "0"], "--method mt=lora: r must be at least 1, got 0"),
    (["--resume"], "--resume: no complete checkpoint_epoch<N>/ checkpoint"),
])
def test_bad_flags_give_one_error_line(tmp_path, tiny_base, vlm_data, capsys, extra, expected):
    with pytest.raises(SystemExit) as exit_info:
        train_vlm.main(vlm_argv(tmp_path, vlm_data, tiny_base, "--n_epochs", "1", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "out")  # nothing written


def test_bad_record_names_its_file(tmp_path, tiny_base, vlm_data, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"train": [{"src": "a b c"}], "test": [{"src": "a b", "tgt": "c d"}]}))
    with pytest.raises(SystemExit):
        train_vlm.main(vlm_argv(tmp_path, dict(vlm_data, mt=str(broken)), tiny_base))
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {broken}: split 'train' record 0: missing key 'tgt'"]
    assert not os.path.exists(tmp_path / "out")


def test_defaults_are_the_authors_train_vlm_values():
    args = train_vlm.parse_args([])
    assert (args.train_batch_size, args.valid_batch_size, args.gradient_accumulation_steps,
            args.n_epochs) == (1, 1, 16, 3)
    assert args.tasks == list(TASKS) and args.temperature == 1.0 and args.mix_tasks and not args.no_adapter
    # The authors' data paths are the defaults; here they are absent, which is the first error.
    with pytest.raises(settings.VLMError,
                       match=r"--dataset_paths dialogue=data/persona/data.json: dataset file"):
        settings.prepare_multitask_args(args)
    assert args.lr == 5e-4 and args.dataset_paths == {t: TASKS[t].default_dataset for t in TASKS}
    full = train_vlm.parse_args(["--no_adapter", "--tasks", "nlg", "mt",
                                 "--model_checkpoint", "/m/gpt2-medium/"])
    with pytest.raises(settings.VLMError):
        settings.prepare_multitask_args(full)
    assert full.lr == 6.25e-5 and full.tasks == ["mt", "nlg"]  # table order
    path = settings.default_output_dir(full, "full", now=datetime(2020, 4, 8, 13, 5, 9))
    assert path == os.path.join("runs",
                                "Apr08_13-05-09_VLM_multitask_full_gpt2-medium_mt-nlg_T1_lr6.25e-05_ep3")


# --- distributed: torchrun with two CPU processes ------------------------------------------------
@pytest.mark.parametrize("methods", [[], EVERY_METHOD_FLAGS], ids=["adapters", "every_method"])
def test_torchrun_two_processes_on_cpu(tmp_path, tiny_base, vlm_data, methods):
    out = tmp_path / "out"
    result = vlm_run_cli("--standalone", "--nproc_per_node", "2", "train_vlm.py",
                         *vlm_argv(tmp_path, vlm_data, tiny_base, "--n_epochs", "1", "--lr", "1e-2",
                                   *methods),
                         module="torch.distributed.run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trainable parameters:") == 1  # rank 0 only
    records = vlm_metrics(out)
    assert [r["iteration"] for r in records] == [2]  # 5 mixed batches: 2 per process, one left over
    model, _, _ = load_checkpoint(str(out))  # loads: the backbone stayed frozen under DDP
    # Each process validated half of each task; the all-reduced NLL is the exact NLL of the whole split.
    vlm_check_per_task_validation(records, model, vlm_data, {t: TASKS[t].task_id for t in ("mt", "nlg")})
