"""train.py and engines/training.py: what trains (and what must not move), checkpoints that reload
exactly, the metrics file and checkpoint rotation, gradient accumulation, user errors, torchrun."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

import train
from engines import loaders, settings, steps, training
from engines.specs import adapter_specs
from models.checkpoint import load_checkpoint
from models.vlm import VersatileLM
from tasks.table import TASKS
from utils.data import IGNORE_INDEX, load_tokenizer
from utils.vocab import GPT2_VOCAB_SIZE

NLG_NAMES = ["The Vaults", "The Eagle", "Alimentum", "Zizzi", "Cotto", "Aromi", "Wildwood", "Strada"]
NLG_TYPES = ["pub", "restaurant", "coffee shop"]
MT_PAIRS = [("a man sleeps", "ein mann schläft"), ("two dogs run", "zwei hunde rennen"),
            ("a woman reads a book", "eine frau liest ein buch"),
            ("children play outside", "kinder spielen draußen"),
            ("the cat is black", "die katze ist schwarz")]


# --- helpers (train_ prefixed: conftest.py is shared) --------------------------------------------
def train_nlg_records(names):
    return [{"src": {"name": n, "eatType": NLG_TYPES[i % 3]}, "tgt": f"{n} is a {NLG_TYPES[i % 3]}."}
            for i, n in enumerate(names)]


def train_write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.fixture
def train_nlg_data(tmp_path):
    """8 training and 3 validation records in the loader's NLG format."""
    return train_write_json(tmp_path / "nlg.json", {"train": train_nlg_records(NLG_NAMES),
                                                     "valid": train_nlg_records(NLG_NAMES[:3]),
                                                     "test": train_nlg_records(NLG_NAMES[3:5])})


@pytest.fixture
def train_mt_data(tmp_path):
    """mt has no 'valid' split: the authors validate it on 'test'."""
    pairs = [{"src": s, "tgt": t} for s, t in MT_PAIRS]
    return train_write_json(tmp_path / "mt.json", {"train": pairs[:4], "test": pairs[4:]})


def train_argv(tmp_path, data, base, *extra, task="nlg", out="out"):
    return ["--task", task, "--dataset_path", data, "--dataset_cache", str(tmp_path / "cache"),
            "--model_checkpoint", base, "--device", "cpu", "--output_dir", str(tmp_path / out),
            "--train_batch_size", "2", "--valid_batch_size", "2", "--gradient_accumulation_steps", "1",
            *extra]


def train_in_process(argv):
    return training.run_training(train.parse_args(argv))


def train_run_cli(*args, module=None):
    env = dict(os.environ, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    command = [sys.executable, *(["-m", module] if module else []), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def train_valid_examples(task_name, data):
    task = TASKS[task_name]
    records = task.load_data(data, load_tokenizer(), splits=[task.splits[1]])[task.splits[1]]
    return task.training_examples(records, task.max_history, max_positions=512)


def train_exact_nll(model, examples, task_ids):
    """Token-level mean NLL computed one example at a time (no padding, no batching)."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for e in examples:
            loss = model(torch.tensor([e["input_ids"]]), token_type_ids=torch.tensor([e["token_type_ids"]]),
                         task_ids=task_ids, labels=torch.tensor([e["labels"]])).loss.item()
            n = sum(1 for label in e["labels"][1:] if label != IGNORE_INDEX)
            total, count = total + loss * n, count + n
    return total / count


def train_metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_trainable_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("trainable parameters:")]
    assert len(lines) == 1, stdout
    return lines[0]


# --- 1. adapter training: only the task's adapters and rows move ---------------------------------
def test_adapter_cli_trains_adapters_and_own_rows_only(tmp_path, tiny_base, train_nlg_data):
    out = tmp_path / "out"
    result = train_run_cli("train.py", *train_argv(tmp_path, train_nlg_data, tiny_base,
                                                   "--adapter_bottleneck", "8",
                                                   "--n_epochs", "2", "--lr", "1e-2", "--eval_before_start",
                                                   "--train_batch_size", "4"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    base = VersatileLM.from_pretrained(tiny_base, adapter_specs({"nlg": 8}))
    # 5. the trainable-parameter line
    expected = base.count_trainable("adapter", "nlg")
    backbone = training.backbone_parameter_count(base)
    assert backbone == sum(p.numel() for p in base.gpt2.parameters()) - 30 * 64
    line = train_trainable_line(result.stdout)
    assert (line.startswith(f"trainable parameters: {expected:,} (")
            and f"of the {backbone:,}-parameter backbone" in line)

    # The saved fingerprint is taken from the trained model at save time, so this load (which
    # checks it against the untouched base) proves every backbone weight and original row is intact.
    model, _, config = load_checkpoint(str(out))
    assert config["mode"] == "adapter" and config["tasks"]["nlg"]["bottleneck"] == 8
    assert config["training_args"]["adapter_bottleneck"] == 8
    assert sorted(os.listdir(out / "checkpoint_epoch2")) == sorted(
        ["adapters.safetensors", "tokenizer.json", "tokenizer_config.json", "vlm_config.json",
         "training_state.json", "training_state.safetensors"])  # the state --resume continues from
    wte, base_wte = model.gpt2.get_input_embeddings().weight, base.gpt2.get_input_embeddings().weight
    own = TASKS["nlg"].token_ids()
    used = [own[i] for i in (0, 1, 2, 3, 10)]  # <bos_nlg> <eos_nlg> <name> <eatType> <response>
    assert not torch.equal(wte[own], base_wte[own])
    for row in used:
        assert not torch.equal(wte[row], base_wte[row])
    others = [i for i in range(wte.shape[0]) if i not in own]
    assert torch.equal(wte[others], base_wte[others])
    for adapter in model.tasks["nlg"].methods["adapter"]:  # initialised at LN=1/0 and zero biases: all moved
        assert not torch.all(adapter.ln.weight == 1) and torch.any(adapter.project_up.bias != 0)
    assert len(train_metrics(out)) == 3  # before start + 2 epochs


def test_adapter_training_leaves_backbone_and_other_rows_bit_identical(tmp_path, tiny_base, train_nlg_data):
    result = train_in_process(train_argv(tmp_path, train_nlg_data, tiny_base, "--adapter_bottleneck", "8",
                                         "--n_epochs", "1", "--lr", "1e-2"))
    base = VersatileLM.from_pretrained(tiny_base)
    trained, initial = result.model.gpt2.state_dict(), base.gpt2.state_dict()
    assert trained.keys() == initial.keys()
    for name, tensor in initial.items():
        if name not in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(trained[name], tensor), name
    wte, base_wte = trained["transformer.wte.weight"], initial["transformer.wte.weight"]
    assert torch.equal(wte[:GPT2_VOCAB_SIZE], base_wte[:GPT2_VOCAB_SIZE])
    for name, task in TASKS.items():
        rows = task.token_ids()
        assert torch.equal(wte[rows], base_wte[rows]) == (name != "nlg"), name
    pad = GPT2_VOCAB_SIZE
    assert torch.equal(wte[pad], base_wte[pad])


# --- 2. full fine-tuning: the saved checkpoint reloads to the same logits --------------------------
def test_full_finetune_checkpoint_reloads_to_identical_logits(tmp_path, tiny_base, train_mt_data, capsys):
    result = train_in_process(train_argv(tmp_path, train_mt_data, tiny_base, "--n_epochs", "1",
                                         "--lr", "1e-3", task="mt"))
    assert result.mode == "full"
    stdout = capsys.readouterr().out
    expected = result.model.count_trainable("full")
    assert expected == sum(p.numel() for p in result.model.parameters())
    assert train_trainable_line(stdout).startswith(f"trainable parameters: {expected:,} (100.1% of the ")

    out = result.output_dir
    loaded, _, config = load_checkpoint(out)
    assert config["mode"] == "full" and os.path.isfile(os.path.join(out, "model.safetensors"))
    assert os.path.isfile(os.path.join(out, "checkpoint_epoch1", "model.safetensors"))
    ids = torch.randint(0, 50287, (2, 9))
    with torch.no_grad():
        expected_logits = result.model.eval()(ids, token_type_ids=ids).logits
        assert torch.equal(loaded(ids, token_type_ids=ids).logits, expected_logits)
        base = VersatileLM.from_pretrained(tiny_base).eval()
        assert not torch.equal(base(ids, token_type_ids=ids).logits, expected_logits)  # it did train
    # mt validates on its test split (it has no 'valid')
    assert len(train_metrics(out)) == 1


# --- 3. metrics.jsonl, checkpoint rotation, exact validation NLL, lr schedule ---------------------
def test_metrics_file_checkpoint_rotation_and_exact_nll(tmp_path, tiny_base, capsys):
    lr = 0.01
    data = train_write_json(tmp_path / "nlg4.json", {"train": train_nlg_records(NLG_NAMES[:4]),
                                                     "valid": train_nlg_records(NLG_NAMES[4:7])})
    result = train_in_process(train_argv(tmp_path, data, tiny_base, "--emb_only", "--n_epochs", "4",
                                         "--lr", str(lr), "--eval_before_start"))
    out = result.output_dir
    model = VersatileLM.from_pretrained(tiny_base, adapter_specs({"nlg": 0}))
    line = train_trainable_line(capsys.readouterr().out)
    assert line.startswith(f"trainable parameters: {model.count_trainable('emb_only', 'nlg'):,} (")
    assert model.count_trainable("emb_only", "nlg") == 11 * 64

    records = train_metrics(out)
    assert records == result.metrics
    assert [r["epoch"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["iteration"] for r in records] == [0, 2, 4, 6, 8]  # 4 examples, batches of 2
    assert records[0]["train_loss"] is None and all(r["train_loss"] > 0 for r in records[1:])
    for r in records:
        assert set(r) == {"epoch", "iteration", "train_loss", "val_nll", "val_ppl", "lr", "elapsed"}
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_nll"]), rel=1e-12)
    assert records[-1]["val_nll"] < records[0]["val_nll"]
    # lr falls linearly from lr (first iteration) to 0 at iteration 8: at iteration k it is lr * (1 - (k-1)/8)
    for r in records[1:]:
        assert r["lr"] == pytest.approx(lr * (1 - (r["iteration"] - 1) / 8), rel=1e-9)

    names = sorted(n for n in os.listdir(out) if n.startswith("checkpoint"))
    assert names == ["checkpoint_epoch2", "checkpoint_epoch3", "checkpoint_epoch4"]
    args = json.loads(open(os.path.join(out, "training_args.json"), encoding="utf-8").read())
    assert args["n_epochs"] == 4 and args["max_history"] == TASKS["nlg"].max_history and args["seed"] == 42

    # The last validation equals an unbatched, token-weighted NLL of the saved final model.
    loaded, _, config = load_checkpoint(out)
    assert config["mode"] == "adapter" and config["tasks"]["nlg"]["bottleneck"] == 0
    nll = train_exact_nll(loaded, train_valid_examples("nlg", data), None)
    assert records[-1]["val_nll"] == pytest.approx(nll, rel=1e-5)


def test_gradient_accumulation_steps_and_flushes_the_epoch_remainder():
    class Quadratic(torch.nn.Module):  # loss (w - mean(input))^2: gradient -2 * mean at w = 0
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, token_type_ids=None, task_ids=None, labels=None):
            return SimpleNamespace(loss=(self.w - input_ids.float().mean()) ** 2)

    class Recorder(torch.optim.SGD):
        grads = []

        def step(self, closure=None):
            self.grads.append(self.param_groups[0]["params"][0].grad.item())

    model = Quadratic()
    optimizer = Recorder(model.parameters(), lr=0.0)
    trainer = steps.create_trainer(model, optimizer, list(model.parameters()), torch.device("cpu"),
                                      gradient_accumulation_steps=3, max_norm=1e9)
    batches = [{"input_ids": torch.tensor([[v]]), "token_type_ids": torch.tensor([[v]]),
                "labels": torch.tensor([[v]]), "task_ids": torch.tensor([0])} for v in (1, 2, 3, 5)]
    trainer.run(batches, max_epochs=2)
    # per epoch: one step over batches 1-3 (mean gradient), one for the remainder (batch 4 alone)
    assert Recorder.grads == pytest.approx([-4.0, -10.0, -4.0, -10.0])


# --- 4. user errors: one line, exit 2, no traceback ------------------------------------------------
@pytest.mark.parametrize("extra, expected", [
    (["--task", "poetry"], "--task"),
    (["--adapter_bottleneck", "-1"], "--adapter_bottleneck"),
    (["--emb_only", "--outputlayer_only"], "--emb_only and --outputlayer_only"),
    (["--emb_only", "--adapter_bottleneck", "4"], "--emb_only"),
    (["--random_init", "--adapter_bottleneck", "4"], "--random_init"),
    (["--n_epochs", "-1"], "--n_epochs"),
    (["--n_epochs", "two"], "--n_epochs"),
    (["--lr", "0"], "--lr"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    (["--device", "cuda:99"], "--device"),
    (["--device", "tpu"], "--device"),
    (["--fp16", "O1"], "--fp16"),
    (["--fp16", "yes"], "--fp16"),
    (["--dataset_path", "/nonexistent/data.json"], "/nonexistent/data.json"),
    (["--model_checkpoint", "/nonexistent/gpt2"], "--model_checkpoint /nonexistent/gpt2"),
    (["--distillation"], "distillated_tgt"),
    (["--bogus_flag"], "--bogus_flag"),
])
def test_bad_flags_give_one_error_line(tmp_path, tiny_base, train_nlg_data, capsys, extra, expected):
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_argv(tmp_path, train_nlg_data, tiny_base, "--n_epochs", "1", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")  # nothing written


def test_bad_dataset_record_and_busy_output_dir(tmp_path, tiny_base, train_nlg_data, capsys):
    records = train_nlg_records(NLG_NAMES[:3])
    records[1] = {"src": {"name": "Zizzi"}}  # no tgt
    data = train_write_json(tmp_path / "broken.json", {"train": records, "valid": records[:1]})
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_argv(tmp_path, data, tiny_base))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(
        f"error: {data}: split 'train' record 1: missing key 'tgt'")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit):
        train.main(train_argv(tmp_path, train_nlg_data, tiny_base, out="busy"))
    assert capsys.readouterr().err.strip().splitlines() == [f"error: --output_dir {tmp_path / 'busy'}: "
                                                            "folder is not empty; choose a new one"]


def test_cli_user_error_is_one_line_without_traceback():
    result = train_run_cli("train.py", "--max_norm", "big")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: argument --max_norm: invalid float value: 'big'"]


def test_default_output_dir_and_task_defaults():
    args = train.parse_args(["--task", "nlg", "--adapter_bottleneck", "10",
                             "--model_checkpoint", "/models/gpt2-medium/"])
    task = TASKS["nlg"]
    mode = settings.training_mode(args)
    settings.fill_task_defaults(args, task, mode)
    assert (args.train_batch_size, args.gradient_accumulation_steps, args.n_epochs,
            args.lr) == (8, 4, 10, 5e-3)
    assert args.dataset_path == task.default_dataset and args.valid_batch_size == 8
    from datetime import datetime
    path = settings.default_output_dir(args, mode, now=datetime(2020, 4, 8, 13, 5, 9))
    assert path == os.path.join("runs", "Apr08_13-05-09_gpt2-medium_nlg_adapter10_lr0.005_ep10")
    full = train.parse_args(["--task", "mt"])
    settings.fill_task_defaults(full, TASKS["mt"], settings.training_mode(full))
    assert (full.train_batch_size, full.gradient_accumulation_steps, full.n_epochs,
            full.lr) == (8, 4, 8, 6.25e-5)


# --- distributed: torchrun with two CPU processes --------------------------------------------------
def test_torchrun_two_processes_on_cpu(tmp_path, tiny_base, train_nlg_data):
    out = tmp_path / "out"
    result = train_run_cli("--standalone", "--nproc_per_node", "2", "train.py",
                           *train_argv(tmp_path, train_nlg_data, tiny_base, "--adapter_bottleneck", "8",
                                       "--n_epochs", "1", "--lr", "1e-2"),
                           module="torch.distributed.run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trainable parameters:") == 1  # rank 0 only
    records = train_metrics(out)
    assert [r["iteration"] for r in records] == [2]  # 4 batches shared by 2 processes
    # The validation NLL, summed over both processes' shares, is the exact NLL of the whole split.
    model, _, _ = load_checkpoint(str(out))  # loads: the backbone stayed frozen under DDP
    nll = train_exact_nll(model, train_valid_examples("nlg", train_nlg_data), TASKS["nlg"].task_id)
    assert records[-1]["val_nll"] == pytest.approx(nll, rel=1e-5)


# --- the other modes ------------------------------------------------------------------------------
def test_outputlayer_only_trains_the_tied_table_and_saves_a_full_checkpoint(tmp_path, tiny_base, capsys):
    data = train_write_json(tmp_path / "nlg2.json", {"train": train_nlg_records(NLG_NAMES[:2]),
                                                     "valid": train_nlg_records(NLG_NAMES[2:3])})
    result = train_in_process(train_argv(tmp_path, data, tiny_base, "--outputlayer_only", "--n_epochs", "1",
                                         "--lr", "1e-2"))
    wte_size = 50287 * 64
    assert result.model.count_trainable("outputlayer_only", "nlg") == wte_size
    assert train_trainable_line(capsys.readouterr().out).startswith(f"trainable parameters: {wte_size:,} (")
    loaded, _, config = load_checkpoint(result.output_dir)
    assert config["mode"] == "full"
    base = VersatileLM.from_pretrained(tiny_base)
    trained, initial = loaded.gpt2.state_dict(), base.gpt2.state_dict()
    for name, tensor in initial.items():
        same = torch.equal(trained[name], tensor)
        assert same == (name not in ("transformer.wte.weight", "lm_head.weight")), name
    assert not torch.equal(trained["transformer.wte.weight"][:GPT2_VOCAB_SIZE],
                           initial["transformer.wte.weight"][:GPT2_VOCAB_SIZE])


def test_distillation_trains_on_distilled_targets_and_validates_on_gold(tmp_path):
    records = [dict(r, distillated_tgt="distilled " + r["tgt"]) for r in train_nlg_records(NLG_NAMES[:3])]
    data = train_write_json(tmp_path / "distilled.json", {"train": records, "valid": records[:2]})
    args = train.parse_args(["--task", "nlg", "--dataset_path", data, "--dataset_cache", "", "--distillation",
                             "--output_dir", str(tmp_path / "out")])
    task, _ = settings.prepare_args(args)
    tokenizer = load_tokenizer()
    train_examples, valid_examples = loaders.split_examples(args, task,
                                                             loaders.load_splits(args, task, tokenizer), 512)

    def targets(examples):
        return [tokenizer.decode([t for t in e["labels"] if t != IGNORE_INDEX][:-1]) for e in examples]

    assert targets(train_examples) == [r["distillated_tgt"] for r in records]
    assert targets(valid_examples) == [r["tgt"] for r in records[:2]]
