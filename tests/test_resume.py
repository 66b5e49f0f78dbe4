"""Crash-safe training: checkpoints that are complete or absent, --resume after SIGKILL reaching
bit-identical weights, and a NaN loss stopping training with the last good checkpoint intact."""
import json
import os
import re
import signal
import time

import pytest
import torch
from conftest import popen_script
from safetensors.torch import load_file, save_file

import train
from engines import run_state, training
from models.checkpoint import load_checkpoint

TYPES = ["pub", "restaurant", "coffee shop"]


# --- helpers (resume_ prefixed: conftest.py is shared) --------------------------------------------
def resume_records(count):
    return [{"src": {"name": f"Place{i}", "eatType": TYPES[i % 3]},
             "tgt": f"Place{i} is a {TYPES[i % 3]} in the city centre."} for i in range(count)]


def resume_data(tmp_path, train_count):
    path = tmp_path / "nlg.json"
    path.write_text(json.dumps({"train": resume_records(train_count), "valid": resume_records(4),
                                "test": resume_records(2)}), encoding="utf-8")
    return str(path)


def resume_argv(tmp_path, data, base, out, *extra):
    # Adapter training with GPT-2's dropout on: equal weights need the torch random state restored.
    return ["--task", "nlg", "--dataset_path", data, "--dataset_cache", str(tmp_path / f"cache_{out.name}"),
            "--model_checkpoint", base, "--device", "cpu", "--output_dir", str(out),
            "--adapter_bottleneck", "8", "--train_batch_size", "2", "--valid_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--lr", "1e-3", "--n_epochs", "3", *extra]


def resume_without_output_dir(argv):
    at = argv.index("--output_dir")
    return argv[:at] + argv[at + 2:]


def resume_popen(argv, log):
    return popen_script("train.py", argv, log)


def resume_tensors(path):
    return load_file(str(path))


def resume_assert_equal_tensors(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def resume_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


# --- 1. SIGKILL in the middle of epoch 2, --resume, the same final weights -------------------------
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, tiny_base, capsys):
    data = resume_data(tmp_path, 60)  # 30 batches of 2 per epoch: about 2 s an epoch here
    full, killed = tmp_path / "full", tmp_path / "killed"
    # the uninterrupted run and the run to kill go side by side (each its own dataset cache)
    reference = resume_popen(resume_argv(tmp_path, data, tiny_base, full, "--eval_before_start"),
                             tmp_path / "full.log")
    victim = resume_popen(resume_argv(tmp_path, data, tiny_base, killed, "--eval_before_start"),
                          tmp_path / "killed.log")
    try:
        deadline = time.time() + 120
        while not (killed / "checkpoint_epoch1").is_dir():
            assert victim.poll() is None and time.time() < deadline, \
                (tmp_path / "killed.log").read_text()[-2000:]
            time.sleep(0.02)
        # checkpoint_epoch1/ appears by rename, complete; wait until epoch 2 has run a few batches
        while max(map(int, re.findall(r"Epoch \[2/3\]: \[(\d+)/30\]", (tmp_path / "killed.log").read_text(
                errors="replace"))), default=0) < 4:
            assert victim.poll() is None and time.time() < deadline
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(30) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    assert reference.wait(300) == 0, (tmp_path / "full.log").read_text()[-3000:]

    # killed during epoch 2: only the epoch-1 checkpoint, no final model
    assert sorted(n for n in os.listdir(killed) if n.startswith("checkpoint")) == ["checkpoint_epoch1"]
    assert not (killed / "vlm_config.json").exists()
    assert sorted(os.listdir(killed / "checkpoint_epoch1")) == [
        "adapters.safetensors", "tokenizer.json", "tokenizer_config.json", "training_state.json",
        "training_state.safetensors", "vlm_config.json"]
    state = json.loads((killed / "checkpoint_epoch1" / "training_state.json").read_text())
    assert state["epoch"] == 1 and state["engine"] == {"iteration": 30, "epoch_length": 30, "max_epochs": 3}

    resumed = resume_popen(resume_argv(tmp_path, data, tiny_base, killed, "--eval_before_start", "--resume"),
                           tmp_path / "resumed.log")
    assert resumed.wait(300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    log = (tmp_path / "resumed.log").read_text()
    assert f"resuming from {killed / 'checkpoint_epoch1'} (epoch 1, iteration 30)" in log
    assert "Epoch [1/3]" not in log and "Epoch [2/3]: [30/30]" in log  # epoch 2 redone, epoch 1 not

    # bit-identical: final adapters and task rows, and the whole last training state (Adam moments,
    # step counts, random states), and the same validation numbers epoch by epoch
    resume_assert_equal_tensors(resume_tensors(full / "adapters.safetensors"),
                                resume_tensors(killed / "adapters.safetensors"))
    resume_assert_equal_tensors(resume_tensors(full / "checkpoint_epoch3" / "training_state.safetensors"),
                                resume_tensors(killed / "checkpoint_epoch3" / "training_state.safetensors"))
    assert (json.loads((full / "checkpoint_epoch3" / "training_state.json").read_text())
            == json.loads((killed / "checkpoint_epoch3" / "training_state.json").read_text()))
    full_metrics, resumed_metrics = resume_metrics(full), resume_metrics(killed)
    assert [r["epoch"] for r in resumed_metrics] == [0, 1, 2, 3]  # epoch 2 once, no second start record
    for a, b in zip(full_metrics, resumed_metrics):
        keys = ("epoch", "iteration", "train_loss", "val_nll", "lr")  # the logged running loss continues too
        assert [a[k] for k in keys] == [b[k] for k in keys]

    # the run's own settings are required
    with pytest.raises(SystemExit) as exit_info:
        train.main(resume_argv(tmp_path, data, tiny_base, killed, "--resume", "--lr", "2e-3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == [
        f"error: --resume: {killed / 'checkpoint_epoch3'} was trained with --lr 0.001, not 0.002; "
        "resume with the run's own settings"]


# --- 2. --resume user errors ------------------------------------------------------------------------
def test_resume_without_a_complete_checkpoint_is_one_line_error(tmp_path, tiny_base, capsys):
    data = resume_data(tmp_path, 4)
    out = tmp_path / "out"
    (out / "checkpoint_epoch1").mkdir(parents=True)  # e.g. written by an older version: no training state
    (out / ".checkpoint_epoch2.partial").mkdir()     # a killed run's unfinished folder
    for argv, expected in [
            (resume_argv(tmp_path, data, tiny_base, out, "--resume"),
             f"error: --resume: no complete checkpoint_epoch<N>/ checkpoint (with training_state.json) "
             f"in --output_dir {out}"),
            (resume_without_output_dir(resume_argv(tmp_path, data, tiny_base, out, "--resume")),
             "error: --resume needs --output_dir: the folder of the run to continue")]:
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [expected]
    assert sorted(os.listdir(out)) == [".checkpoint_epoch2.partial", "checkpoint_epoch1"]  # nothing written


# --- 3. a NaN loss stops training; the last good checkpoint stays and resumes -----------------------
@pytest.mark.parametrize("mode", [["--adapter_bottleneck", "8"], ["--adapter_bottleneck", "0"]],
                         ids=["adapter", "full"])
def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, tiny_base, capsys, monkeypatch,
                                                                    mode):
    data = resume_data(tmp_path, 8)  # 4 batches per epoch: the 6th training forward is epoch 2, iteration 6
    settings = ["--gradient_accumulation_steps", "1", "--n_epochs", "2", *mode]
    original = training.build_model
    calls = []

    def poisoned_model(args, task, mode):
        model = original(args, task, mode)
        forward = model.forward

        def nan_at_sixth(*inputs, labels=None, **options):
            output = forward(*inputs, labels=labels, **options)
            if labels is not None:  # training forwards only (validation passes no labels)
                calls.append(1)
                if len(calls) == 6:
                    output.loss = output.loss * float("nan")
            return output
        model.forward = nan_at_sixth
        return model

    monkeypatch.setattr(training, "build_model", poisoned_model)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main(resume_argv(tmp_path, data, tiny_base, out, *settings))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"error: training loss is nan at epoch 2, iteration 6: "
                                            "training stopped; "
                                            f"last complete checkpoint: {out / 'checkpoint_epoch1'}")
    assert "Traceback" not in err
    assert sorted(os.listdir(out)) == ["checkpoint_epoch1", "metrics.jsonl", "tensorboard",
                                       "training_args.json"]
    loaded, _, config = load_checkpoint(str(out / "checkpoint_epoch1"))  # loads: complete and consistent
    assert all(torch.isfinite(p).all() for p in loaded.parameters())

    # the kept checkpoint resumes to exactly the weights of a run that never saw the NaN
    monkeypatch.setattr(training, "build_model", original)
    train.main(resume_argv(tmp_path, data, tiny_base, out, *settings, "--resume"))
    clean = tmp_path / "clean"
    train.main(resume_argv(tmp_path, data, tiny_base, clean, *settings))
    weights = "adapters.safetensors" if mode[1] != "0" else "model.safetensors"
    resume_assert_equal_tensors(resume_tensors(clean / weights), resume_tensors(out / weights))
    assert [r["val_nll"] for r in resume_metrics(out)] == [r["val_nll"] for r in resume_metrics(clean)]
    # resuming a finished run trains nothing more: it only writes the final model again
    final = resume_tensors(out / weights)
    train.main(resume_argv(tmp_path, data, tiny_base, out, *settings, "--resume"))
    resume_assert_equal_tensors(final, resume_tensors(out / weights))
    assert len(resume_metrics(out)) == 2


# --- 4. the checkpoint writer: a crash while writing leaves no checkpoint folder -------------------
def test_checkpoint_is_renamed_into_place_only_when_complete(tmp_path):
    def save(path, exported=True):
        os.makedirs(path)
        (open(os.path.join(path, "weights"), "w")).write("w")

    def crashing_state(path):
        raise KeyboardInterrupt  # stands for a kill between the model files and the training state

    run_state.CheckpointKeeper(str(tmp_path), save,
                              save_state=lambda p: open(os.path.join(p, "state"), "w").close())(1)
    with pytest.raises(KeyboardInterrupt):
        run_state.CheckpointKeeper(str(tmp_path), save, save_state=crashing_state)(2)
    assert sorted(os.listdir(tmp_path)) == [".checkpoint_epoch2.partial", "checkpoint_epoch1"]
    assert sorted(os.listdir(tmp_path / "checkpoint_epoch1")) == ["state", "weights"]
    # the next attempt clears the leftover and completes
    run_state.CheckpointKeeper(str(tmp_path), save,
                              save_state=lambda p: open(os.path.join(p, "state"), "w").close())(2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_epoch1", "checkpoint_epoch2"]


def test_optimizer_state_round_trip_stores_masked_rows_sparsely(tmp_path):
    table = torch.nn.Parameter(torch.randn(10, 3))
    bias = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([table, bias], lr=0.1, weight_decay=0.0)
    for _ in range(2):
        table.grad = torch.zeros(10, 3)
        table.grad[[2, 7]] = torch.randn(2, 3)  # only two rows train, like a task's own token rows
        bias.grad = torch.randn(3)
        optimizer.step()
    state, tensors = run_state.optimizer_state(optimizer)
    assert state["sparse"] == {"optimizer.0.exp_avg": [10, 3], "optimizer.0.exp_avg_sq": [10, 3]}
    assert tensors["optimizer.0.exp_avg.rows"].tolist() == [2, 7]
    save_file(tensors, str(tmp_path / "s.safetensors"))
    fresh = torch.optim.AdamW([torch.nn.Parameter(table.detach().clone()),
                               torch.nn.Parameter(bias.detach().clone())],
                              lr=0.1, weight_decay=0.0)
    run_state.restore_optimizer(fresh, json.loads(json.dumps(state)),
                               load_file(str(tmp_path / "s.safetensors")), "x")
    before, after = optimizer.state_dict(), fresh.state_dict()
    assert before["param_groups"] == after["param_groups"]
    for index in (0, 1):
        for name, value in before["state"][index].items():
            assert torch.equal(value, after["state"][index][name]), (index, name)
