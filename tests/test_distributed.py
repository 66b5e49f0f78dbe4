"""torchrun with two CPU (gloo) processes trains exactly what one process trains on the same global
batches: same task weights, same validation NLL, for every method.

Why the two runs see the same batches: LengthGroupedBatchSampler builds one batch sequence from
(seed, epoch) in every process and rank r takes batches r, r+2, r+4, ... One process with
--gradient_accumulation_steps 2 steps over batches (0, 1), (2, 3), ...; two processes with one
batch each step over the same pairs, DistributedDataParallel averaging the two gradients just as
accumulation averages them (each loss divided by 2), and clipping sees the same mean gradient.

What differs on purpose: the learning rate falls per iteration (the authors' schedule), and one
process takes two iterations per step where each of two processes takes one. So the reference run
keeps the real ignite schedule but advances it once per optimizer step (the lr of step j is the
one the distributed run uses at its iteration j); everything else is train.py unchanged."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import EVERY_METHOD_SPECS, REPO, method_flags, tiny_method_options
from ignite.engine import Events
from ignite.handlers import PiecewiseLinear
from transformers import GPT2Config, GPT2LMHeadModel

import train
from engines import run_state, training
from engines.specs import builtin_spec
from models.checkpoint import ADAPTER_WEIGHTS, load_tensors, task_state_dict
from models.methods import METHODS, key_prefix, method_class
from models.vlm import VersatileLM

NAMES = ["The Vaults", "The Eagle", "Alimentum", "Zizzi", "Cotto", "Aromi", "Wildwood", "Strada",
         "Browns Cambridge", "The Golden Curry", "Fitzbillies", "The Punter", "Midsummer House",
         "Clowns", "The Wrestlers", "Loch Fyne", "Bibimbap House", "Giraffe", "The Phoenix"]
TYPES = ["pub", "restaurant", "coffee shop"]
AREAS = ["riverside", "city centre"]


def records(names, offset=0):
    """NLG records of different lengths (one or two slots, short and long texts)."""
    out = []
    for i, name in enumerate(names, offset):
        src = {"name": name, "eatType": TYPES[i % 3]}
        tgt = f"{name} is a {TYPES[i % 3]}."
        if i % 2:
            src["area"] = AREAS[i % 2]
            tgt = (f"In the {AREAS[i % 2]} area there is {name}, a {TYPES[i % 3]} "
                   + "worth a visit. " * (i % 4))
        out.append({"src": src, "tgt": tgt.strip()})
    return out


@pytest.fixture(scope="module")
def no_dropout_base(tmp_path_factory):
    """A tiny random GPT-2 without dropout: the processes draw different dropout masks."""
    path = tmp_path_factory.mktemp("tiny_gpt2_no_dropout")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def nlg_data(tmp_path_factory):
    """16 training records (8 batches of 2: 4 per process) and 5 validation records (3 + 2)."""
    path = tmp_path_factory.mktemp("nlg") / "nlg.json"
    path.write_text(json.dumps({"train": records(NAMES[:16]), "valid": records(NAMES[14:], offset=3)}),
                    encoding="utf-8")
    return str(path)


# The task's module under test: its train.py flags and its options (no dropout: one process and
# two must draw nothing random). Every registered method is in a case, ten of them composed for one
# task and p-tuning with UniPELT for another, each training its own tensors beside the others'.
def method_case(spec):
    methods = tiny_method_options(spec, lora={"dropout": 0.0})
    return method_flags(methods), methods


METHOD_CASES = {"adapter": (["--adapter_bottleneck", "8"], {"adapter": {"bottleneck": 8}}),
                "ten_methods": method_case(EVERY_METHOD_SPECS[0]),
                "ptuning+unipelt": method_case(EVERY_METHOD_SPECS[1]),
                # pruned (--sparsity): every process fixes the same masks and keeps them
                "sparse_houlsby": (["--method", "houlsby", "--houlsby_bottleneck", "4", "--sparsity", "0.5",
                                    "--prune", "magnitude"], {"houlsby": {"bottleneck": 4}})}


def test_the_cases_hold_every_method():
    assert {name for _, options in METHOD_CASES.values() for name in options} == set(METHODS)


def argv(tmp_path, data, base, out, accumulation, method="adapter"):
    return ["--task", "nlg", "--dataset_path", data, "--dataset_cache", "", "--model_checkpoint", base,
            "--device", "cpu", "--output_dir", str(tmp_path / out), *METHOD_CASES[method][0],
            "--train_batch_size", "2", "--valid_batch_size", "2", "--gradient_accumulation_steps",
            str(accumulation), "--n_epochs", "2", "--lr", "1e-2", "--max_norm", "0.5", "--seed", "3",
            "--eval_before_start"]


def metrics(out):
    with open(os.path.join(out, run_state.METRICS_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def per_step_schedule(trainer, optimizer, lr, total_iterations, accumulation=2):
    """The real schedule over total/accumulation points, advanced at the iteration that ends a step."""
    scheduler = PiecewiseLinear(optimizer, "lr", [(0, lr), (total_iterations // accumulation, 0.0)])
    trainer.add_event_handler(Events.ITERATION_STARTED(every=accumulation), scheduler)
    return scheduler


@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_two_processes_match_one_process_on_the_same_global_batches(tmp_path, no_dropout_base, nlg_data,
                                                                    monkeypatch, method):
    env = dict(os.environ, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "train.py", *argv(tmp_path, nlg_data, no_dropout_base, "ddp", accumulation=1, method=method)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    monkeypatch.setattr(training, "attach_lr_schedule", per_step_schedule)
    single = training.run_training(train.parse_args(argv(tmp_path, nlg_data, no_dropout_base, "single",
                                                         accumulation=2, method=method)))

    ddp_records, single_records = metrics(tmp_path / "ddp"), metrics(single.output_dir)
    # 8 batches an epoch: 4 iterations per process, 8 in one process; 4 optimizer steps either way.
    assert [r["iteration"] for r in ddp_records] == [0, 4, 8]
    assert [r["iteration"] for r in single_records] == [0, 8, 16]
    # The same learning rate at every step (the last one shown at the end of each epoch) ...
    for ddp, one in zip(ddp_records[1:], single_records[1:]):
        assert one["lr"] == pytest.approx(ddp["lr"], rel=1e-12)
    # ... the same validation NLL before training and after each epoch ...
    for ddp, one in zip(ddp_records, single_records):
        assert one["val_nll"] == pytest.approx(ddp["val_nll"], rel=1e-5)
    assert single_records[-1]["val_nll"] < single_records[0]["val_nll"]  # and training did something
    # ... and the same trained adapters and task rows.
    ddp_weights = load_tensors(os.path.join(tmp_path / "ddp", ADAPTER_WEIGHTS))  # pruned ones made dense
    single_weights = load_tensors(os.path.join(single.output_dir, ADAPTER_WEIGHTS))
    assert sorted(ddp_weights) == sorted(single_weights)
    options = {name: method_class(name).resolve(o) for name, o in METHOD_CASES[method][1].items()}
    initial = task_state_dict(VersatileLM.from_pretrained(no_dropout_base, [builtin_spec("nlg", options)]),
                              ["nlg"])
    assert sorted(single_weights) == sorted(initial)
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, rtol=0, atol=1e-5, msg=name)
    if "--sparsity" in METHOD_CASES[method][0]:  # half of each weight matrix pruned and still exactly 0
        weights = [name for name in ddp_weights if name.endswith(".weight")]
        assert len(weights) == 2 * 2 * 2
        assert all(int((ddp_weights[name] == 0).sum()) == ddp_weights[name].numel() // 2 for name in weights)
    # the comparison is between trained weights, not two copies of the initial ones: every method
    # of the case, and the task's own rows, trained
    moved = {name for name, tensor in single_weights.items() if not torch.equal(tensor, initial[name])}
    for prefix in [key_prefix("nlg", name) for name in options] + ["task_embeddings.nlg"]:
        assert any(name.startswith(prefix) for name in moved), prefix
