"""federated.py (issue 29): FedAvg of one task's module on Flower. The split of the data among
clients, the screening and weighted mean of updates, differential privacy's clipping and
accounting, a simulated run with a client sending NaN and one dying, its resumption after SIGKILL,
and a deployment (SuperLink and two SuperNodes on 127.0.0.1) whose two identical clients give
train.py's own result bit for bit."""
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO
from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict
from safetensors.torch import load_file

import evaluate
import federated
from engines import fed_strategy
from engines.fed_data import dirichlet_split, iid_split, split_indices
from engines.fed_strategy import (
    ARRAYS,
    METRICS,
    TaskFedAvg,
    build_strategy,
    gaussian_epsilon,
    privacy_report,
    screen_replies,
    to_record,
)
from models.checkpoint import load_checkpoint
from tasks.table import get_task
from tasks.task_file import load_task_file
from utils.errors import VLMError

WORDS = "a man is riding a horse the dog runs in park two women sit on bench child plays with ball".split()
BIN = os.path.dirname(sys.executable)


# --- helpers (fed_ prefixed: conftest.py is shared) -------------------------------------------------
def fed_data(tmp_path, train=24, valid=4):
    rng = random.Random(0)

    def record(i):
        src = " ".join(rng.choice(WORDS) for _ in range(3 + (i * 7) % 20))
        return {"src": src, "tgt": "ein " + src}
    path = tmp_path / "mt.json"
    path.write_text(json.dumps({"train": [record(i) for i in range(train)],
                                "test": [record(100 + i) for i in range(valid)]}), encoding="utf-8")
    return str(path)


def fed_flags(data, base, cache):
    """Local training flags both federated.py and train.py take."""
    return ["--task", "mt", "--method", "lora", "--lora_r", "2", "--dataset_path", data, "--dataset_cache",
            cache, "--model_checkpoint", base, "--device", "cpu", "--train_batch_size", "4", "--lr", "1e-3",
            "--seed", "3"]


def fed_run_flags(data, base, cache, out, *extra):
    return [*fed_flags(data, base, cache), "--output_dir", str(out), "--eval_prompts", "2",
            "--eval_max_length", "6", *extra]


def fed_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def fed_env(**extra):
    return dict(os.environ, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                OMP_NUM_THREADS="1", FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", **extra)


def fed_stop(process):
    """SIGKILL a process we started in its own session, with everything it started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def fed_free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def fed_messages(monkeypatch):
    """Messages outside a running app need the task identity a running app sets (as Flower's own
    simulation entry sets it); restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity
    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def fed_reply(tensors, examples, node=1):
    """A client's reply as the server receives it (content and source node)."""
    content = RecordDict({ARRAYS: to_record(tensors), METRICS: MetricRecord({"num-examples": examples})})
    return Message(content, message_type=MessageType.TRAIN, dst_node_id=node)


# --- 1. the split -----------------------------------------------------------------------------------
def test_iid_split_deals_a_seeded_permutation():
    parts = iid_split(10, 3, seed=5)
    assert sorted(i for part in parts for i in part) == list(range(10))
    assert [len(p) for p in parts] == [4, 3, 3]
    assert iid_split(10, 3, seed=5) == parts and iid_split(10, 3, seed=6) != parts


def test_dirichlet_split_counts_are_reproducible_by_seed_and_skewed_by_alpha():
    keys = [f"label{i % 4}" for i in range(200)]
    parts = dirichlet_split(keys, 4, alpha=0.3, seed=11)
    assert sorted(i for part in parts for i in part) == list(range(200))  # every record exactly once
    assert dirichlet_split(keys, 4, alpha=0.3, seed=11) == parts
    assert dirichlet_split(keys, 4, alpha=0.3, seed=12) != parts
    counts = [[sum(keys[i] == f"label{k}" for i in part) for k in range(4)] for part in parts]
    assert counts == [[2, 2, 6, 25], [46, 0, 1, 20], [0, 0, 1, 4], [2, 48, 42, 1]]  # (labels 0-3) per client

    def top_share(alpha):  # the share of a client's most frequent label, averaged over clients and seeds
        shares = []
        for seed in range(10):
            for part in dirichlet_split(keys, 4, alpha, seed):
                shares.append(max(sum(keys[i] == f"label{k}" for i in part) for k in range(4)) / len(part))
        return sum(shares) / len(shares)
    assert top_share(0.1) > 0.7 and top_share(1000.0) < 0.35  # IID would give 0.25 plus noise


def test_dirichlet_split_refuses_an_impossible_minimum():
    with pytest.raises(VLMError, match="raise --alpha or lower --clients"):
        dirichlet_split(["a"] * 6, 3, alpha=0.01, seed=0, min_records=2)


def test_partition_keys_of_each_kind(tokenizer):
    users = load_task_file(os.path.join(REPO, "data/tasks/nemo_article.json"))
    sentiment = users["sentiment"].load_data(os.path.join(REPO, "data/samples/sentiment"), tokenizer,
                                             ["train"])
    assert {users["sentiment"].partition_key(item) for item in sentiment["train"]} == \
        {"positive", "negative", "neutral"}
    folder = os.path.join(REPO, "data/samples/intent_and_slot")
    intents = users["intent_and_slot"].load_data(folder, tokenizer, ["train"])["train"]
    assert users["intent_and_slot"].partition_key(intents[0]) == "Intent: play_music"
    nlg = get_task("nlg")
    record = {"src": {"name": [464, 40089], "eatType": [2131]}, "tgt": []}
    assert nlg.partition_key(record) == "name 464 40089"
    mt = get_task("mt")
    assert [mt.partition_key({"src": [1] * n, "tgt": []}) for n in (3, 8, 17)] == \
        ["src 0-7", "src 8-15", "src 16-23"]
    with pytest.raises(VLMError, match="use --partition iid"):
        split_indices(get_task("dialogue"), [{}] * 4, 2, "dirichlet", 0.5, 0)


# --- 2. the average ---------------------------------------------------------------------------------
def test_weighted_mean_is_the_hand_computed_mean_and_one_client_comes_back_bit_for_bit(fed_messages):
    rng = np.random.default_rng(0)
    a = {"x": rng.standard_normal((3, 4)).astype(np.float32), "y": rng.standard_normal(5).astype(np.float32)}
    b = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in a.items()}
    strategy = TaskFedAvg({}, 1.0, 1, seed=0)
    mean, metrics = strategy.aggregate_train(1, [fed_reply(a, 3), fed_reply(b, 5)])
    for name in a:
        by_hand = (3.0 * a[name].astype(np.float64) + 5.0 * b[name].astype(np.float64)) / 8.0
        by_hand = by_hand.astype(np.float32)
        assert np.array_equal(mean[name].numpy(), by_hand)
    assert metrics["num-examples"] == 8
    alone, _ = strategy.aggregate_train(1, [fed_reply(a, 7)])
    assert all(np.array_equal(alone[k].numpy(), a[k]) for k in a)
    # not enough usable updates: no average
    assert TaskFedAvg({}, 1.0, 2, seed=0).aggregate_train(1, [fed_reply(a, 7)]) == (None, None)


def test_nan_shape_and_dead_clients_are_left_out_with_their_reasons(caplog, fed_messages):
    good = {"x": np.ones((2, 3), np.float32)}
    nan = {"x": np.full((2, 3), np.nan, np.float32)}
    wide = {"x": np.ones((2, 4), np.float32)}
    extra = {"x": np.ones((2, 3), np.float32), "y": np.ones(1, np.float32)}
    asked = Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=15)
    dead = Message(Error(code=0, reason="ActorDiedError: the worker process died\ntraceback"), reply_to=asked)
    pairs = [(10, fed_reply(good, 4)), (11, fed_reply(nan, 4)), (12, fed_reply(wide, 4)),
             (13, fed_reply(extra, 4)), (14, fed_reply(good, 0)), (15, dead), (16, None)]
    clients_of = {node: node - 10 for node, _ in pairs}
    with caplog.at_level("WARNING", logger="engines.fed_strategy"):
        usable, left_out = screen_replies(pairs, {"x": (2, 3)}, clients_of)
    assert usable == [pairs[0][1]]
    assert left_out == {1: "left out: x holds NaN or infinite values",
                        2: "left out: x has shape (2, 4), expected (2, 3)",
                        3: "left out: tensors differ from the task's: missing [], unexpected ['y']",
                        4: "left out: num-examples is 0, not a positive integer",
                        5: "failed: ActorDiedError: the worker process died",
                        6: "failed: no reply within --round_timeout"}
    logged = [f"client {c} {reason}" for c, reason in left_out.items()]
    assert [r.getMessage() for r in caplog.records] == logged


# --- 3. differential privacy ------------------------------------------------------------------------
class _Grid:
    def get_node_ids(self):
        return [101, 102]


def _dp_args(noise, clip):
    return type("Args", (), dict(fraction_fit=1.0, min_fit_clients=2, seed=0, dp_noise=noise, dp_clip=clip,
                                 dp_delta=1e-5, clients=2))()


def test_dp_clips_each_update_to_the_norm_and_adds_noise_of_the_documented_std(fed_messages):
    current = {"w": np.zeros(20000, np.float32)}
    big = {"w": np.full(20000, 0.5, np.float32)}  # norm 70.7, clipped to 2
    small = {"w": np.full(20000, 0.001, np.float32)}  # norm 0.14, kept
    clients_of = {101: 0, 102: 1}
    strategy = build_strategy(clients_of, _dp_args(0.0, 2.0))
    list(strategy.configure_train(1, to_record(current), fed_strategy.round_config("{}", 1), _Grid()))
    mean, _ = strategy.aggregate_train(1, [fed_reply(big, 1), fed_reply(small, 1)])
    clipped = 0.5 * 2.0 / math.sqrt(20000 * 0.25)
    np.testing.assert_allclose(mean["w"].numpy(), (clipped + 0.001) / 2, rtol=1e-5)
    noisy = build_strategy(clients_of, _dp_args(1.5, 2.0))
    list(noisy.configure_train(1, to_record(current), fed_strategy.round_config("{}", 1), _Grid()))
    np.random.seed(0)
    mean, _ = noisy.aggregate_train(1, [fed_reply(small, 1), fed_reply(small, 1)])
    noise = mean["w"].numpy().astype(np.float64) - 0.001
    assert abs(noise.std() / (1.5 * 2.0 / 2) - 1) < 0.03  # std = noise x clip / sampled clients


def test_reported_epsilon_is_the_best_renyi_order_and_unequal_weights_lower_the_noise_multiplier():
    rdp = 3 / (2 * 1.1 ** 2)  # three rounds at noise multiplier 1.1
    numeric = min(a * rdp + math.log(1e5) / (a - 1) for a in np.linspace(1.001, 200, 400000))
    assert gaussian_epsilon(rdp, 1e-5) == pytest.approx(numeric, rel=1e-6)
    report, after = privacy_report(_dp_args(1.1, 1.0), 2, [5, 5], 0.0)
    assert report["effective_noise_multiplier"] == pytest.approx(1.1)
    assert after == pytest.approx(1 / (2 * 1.21))
    report, _ = privacy_report(_dp_args(1.1, 1.0), 2, [9, 1], 0.0)  # one client weighs 0.9
    assert report["effective_noise_multiplier"] == pytest.approx(1.1 / (2 * 0.9))


# --- 4. bad flags -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    ([], "averages a task's own module"),
    (["--method", "lora", "--min_fit_clients", "4", "--clients", "3"], "--min_fit_clients must be between"),
    (["--method", "lora", "--partition", "skewed"], "--partition skewed: choose iid or dirichlet"),
    (["--method", "lora", "--dp_clip", "1"], "--dp_clip needs --dp_noise"),
    (["--method", "lora", "--mode", "deployment"], "--mode deployment needs --superlink"),
    (["--method", "lora", "--resume"], "--resume: no complete checkpoint_round"),
])
def test_bad_flags_are_one_error_line(tmp_path, tiny_base, capsys, flags, message):
    data = fed_data(tmp_path)
    with pytest.raises(SystemExit) as stop:
        federated.main(["--task", "mt", "--dataset_path", data, "--model_checkpoint", tiny_base,
                        "--output_dir", str(tmp_path / "out"), *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


# --- 5. whole runs: a simulation with faults, its resumption after SIGKILL, a deployment --------------
FAULTS = "nan@1:1,die@1:2"  # client 1 sends NaN in round 1, then dies in round 2
LIMIT = 300  # seconds any one run may take (they share the machine's cores)


def fed_start(argv, log, env, script=None):
    """A process of ours in its own session (fed_stop kills it with all it started)."""
    command = [sys.executable, script, *argv] if script else argv
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def fed_wait(process, log, deadline):
    """The exit code, waiting at most until `deadline` (then the log's tail fails the test)."""
    try:
        return process.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{log} did not end in time:\n{open(log).read()[-3000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_base):
    """Every whole run at once (most of their time is waiting): a simulation of two clients (with
    differential privacy's noise, which a resumed run must draw alike) and its
    twin, SIGKILLed once round 1 is kept and then resumed; a SuperLink with two SuperNodes on
    127.0.0.1 that share one dataset, and train.py on it for reference."""
    tmp = tmp_path_factory.mktemp("federated")
    data = fed_data(tmp)
    simulation = ["--clients", "2", "--partition", "dirichlet", "--alpha", "1.0", "--rounds", "2",
                  "--min_fit_clients", "1", "--dp_noise", "0.01", "--dp_clip", "1.0"]  # noise: resumed too
    sim_env = fed_env(VLM_FEDERATED_FAULTS=FAULTS)
    deploy_env = fed_env(FLWR_HOME=str(tmp / "flwr_home"))
    link, *node_ports = fed_free_ports(3)
    out = {name: tmp / name for name in ("whole", "killed", "deployed", "train")}
    argv = {name: fed_run_flags(data, tiny_base, str(tmp / f"cache_{name}"), out[name], *simulation)
            for name in ("whole", "killed")}
    processes, logs = {}, {name: tmp / f"{name}.log" for name in
                           ("whole", "killed", "resumed", "deployed", "train", "superlink", "node0", "node1")}
    try:
        processes["superlink"] = fed_start([f"{BIN}/flower-superlink", "--insecure", "--host", "127.0.0.1",
                                            "--port", str(link), "--disable-runtime-dependency-installation"],
                                           logs["superlink"], deploy_env)
        for i, port in enumerate(node_ports):
            processes[f"node{i}"] = fed_start(
                [f"{BIN}/flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--host",
                 "127.0.0.1", "--port", str(port), "--node-config",
                 f'partition-id={i} dataset-path="{data}"'],
                logs[f"node{i}"], deploy_env)
        for name in ("whole", "killed"):
            processes[name] = fed_start(argv[name], logs[name], sim_env, "federated.py")
        processes["deployed"] = fed_start(
            [*fed_run_flags(data, tiny_base, str(tmp / "cache_deployed"), out["deployed"]), "--mode",
             "deployment", "--superlink", f"127.0.0.1:{link}", "--clients", "2", "--rounds", "1",
             "--connect_timeout", "120", "--round_timeout", "240"],
            logs["deployed"], deploy_env, "federated.py")
        processes["train"] = fed_start([*fed_flags(data, tiny_base, str(tmp / "cache_train")), "--n_epochs",
                                        "1", "--output_dir", str(out["train"])], logs["train"], fed_env(),
                                       "train.py")
        deadline = time.time() + LIMIT
        victim = processes["killed"]
        while not (out["killed"] / "checkpoint_round1").is_dir():
            assert victim.poll() is None and time.time() < deadline, logs["killed"].read_text()[-3000:]
            time.sleep(0.05)
        fed_stop(victim)  # SIGKILL, and Ray's processes with it
        kept = sorted(p.name for p in out["killed"].iterdir() if p.name.startswith("checkpoint_round"))
        processes["resumed"] = fed_start([*argv["killed"], "--resume"], logs["resumed"], sim_env,
                                         "federated.py")
        deadline = time.time() + LIMIT
        codes = {name: fed_wait(processes[name], logs[name], deadline)
                 for name in ("whole", "resumed", "deployed", "train")}
    finally:
        for process in processes.values():
            fed_stop(process)
    return {"out": out, "codes": codes, "logs": {k: v.read_text() for k, v in logs.items()}, "data": data,
            "kept_when_killed": kept}


def fed_check(runs, *names):
    for name in names:
        assert runs["codes"][name] == 0, runs["logs"][name][-4000:]
        assert not re.search(r"(Future|Deprecation)Warning|\bdeprecat", runs["logs"][name], re.IGNORECASE), \
            f"{name} printed a deprecation:\n{runs['logs'][name][-3000:]}"


def test_simulation_reports_every_round_and_leaves_out_the_nan_and_the_dead_client(runs):
    fed_check(runs, "whole")
    out = runs["out"]["whole"]
    records = fed_records(out)
    assert [r["round"] for r in records] == [0, 1, 2]
    one, two = records[1]["clients"], records[2]["clients"]
    first = sorted(load_file(str(out / "checkpoint_round1" / "federated_state.safetensors")))[0]
    assert [(c["client"], c["status"]) for c in one] == [
        (0, "ok"), (1, f"left out: {first} holds NaN or infinite values")]
    assert [(c["client"], c["status"][:8]) for c in two] == [(0, "ok"), (1, "failed: ")]
    assert records[1]["participants"] == records[2]["participants"] == 1
    assert sum(c["examples"] for c in one) == 24  # the two parts hold the whole training split
    assert all(math.isfinite(r["val_nll"]) and {"bleu", "sacrebleu"} <= set(r["metrics"]) for r in records)
    assert records[2]["val_nll"] < records[0]["val_nll"]
    full = 4 * sum(p.numel() for p in load_checkpoint(str(out))[0].gpt2.parameters())
    state = load_file(str(out / "checkpoint_round1" / "federated_state.safetensors"))
    payload = sum(t.numel() * 4 for t in state.values())
    for client in one:  # each tensor travels as numpy's .npy bytes: the values and a short header
        assert client["full_ft_bytes_down"] == full
        assert payload < client["bytes_down"] < payload + 200 * len(state)
        assert client["bytes_up"] == client["bytes_down"] and client["train_loss"] > 0
    assert records[1]["communication_saving"] == pytest.approx(full / one[0]["bytes_down"])
    assert records[1]["communication_saving"] > 1000
    # noise std 0.01 x 1.0 / 2 sampled clients; one client averaged, so one update moves the mean by
    # up to the whole clip: the effective noise multiplier is 0.005, for each of the two releases
    dp = records[2]["dp"]
    assert dp["noise_std"] == dp["effective_noise_multiplier"] == pytest.approx(0.005)
    assert dp["epsilon"] == pytest.approx(gaussian_epsilon(2 / (2 * 0.005 ** 2), 1e-5))
    assert (out / "federated.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "client 1 left out: " in runs["logs"]["whole"] and "client 1 failed: " in runs["logs"]["whole"]


def test_each_round_is_an_ordinary_task_checkpoint(runs, tmp_path, capsys):
    fed_check(runs, "whole", "train")
    out = runs["out"]["whole"]
    for folder in (out / "checkpoint_round1", out / "checkpoint_round2", out):
        _, _, config = load_checkpoint(str(folder))
        assert config["mode"] == "adapter" and list(config["tasks"]) == ["mt"]
    # the same files as train.py's output, and evaluate.py reads it as it is
    train_files = {p.name for p in runs["out"]["train"].iterdir() if p.is_file()} - {"metrics.jsonl",
                                                                                      "training_args.json"}
    assert train_files <= {p.name for p in out.iterdir()}
    evaluate.main(["--task", "mt", "--model_checkpoint", str(out), "--dataset_path", runs["data"],
                   "--device", "cpu", "--no_sample", "--max_length", "4",
                   "--output_dir", str(tmp_path / "eval")])
    assert "bleu=" in capsys.readouterr().out and (tmp_path / "eval" / "mt_metrics.json").is_file()


def test_resume_after_sigkill_ends_with_the_same_module(runs):
    fed_check(runs, "whole", "resumed")
    whole, killed = runs["out"]["whole"], runs["out"]["killed"]
    assert runs["kept_when_killed"] == ["checkpoint_round1"]
    for name in ("adapters.safetensors", "checkpoint_round2/federated_state.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(killed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    def without_time(records):
        return [{k: v for k, v in r.items() if k != "elapsed"} for r in records]
    assert without_time(fed_records(killed)) == without_time(fed_records(whole))
    assert "resuming from" in runs["logs"]["resumed"]


def test_deployment_of_two_identical_clients_gives_train_py_bit_for_bit(runs):
    """Both SuperNodes train on the same dataset from the same global module with the same seed:
    FedAvg of their two updates is train.py's one epoch, bit for bit."""
    fed_check(runs, "deployed", "train")
    out = runs["out"]["deployed"]
    ours = load_file(str(out / "adapters.safetensors"))
    theirs = load_file(str(runs["out"]["train"] / "adapters.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    clients = [(c["client"], c["status"], c["examples"]) for c in fed_records(out)[1]["clients"]]
    assert clients == [(0, "ok", 24), (1, "ok", 24)]
    assert (out / "flower_app" / "pyproject.toml").is_file()
