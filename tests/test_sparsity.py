"""--sparsity S --prune snip|magnitude|random (SparseAdapter): which tensors are pruned and by how
many exactly, SNIP's and magnitude's choice on a known case, masks kept through AdamW (weight decay
included), compact checkpoints that round-trip exactly, train.py and train_vlm.py runs (frozen
backbone, --resume keeps the masks), combined and mixed batches equal to the single-task checkpoint,
Large-Sparse's bottleneck, and bad input as one error line."""
import contextlib
import io
import json
import math
import os
import re
import shutil
import struct
from types import SimpleNamespace

import pytest
import torch
from conftest import run_script, tiny_gpt2
from safetensors.torch import load_file, save_file
from torch import nn

import evaluate
import train
import train_vlm
from engines import multitask, training
from engines.generate import DecodingOptions, generate
from engines.pruning import prune_tasks
from models.checkpoint import load_checkpoint, save_checkpoint
from models.combine import combine, load_task_checkpoints, write_vlm
from models.methods import METHODS, BackboneShape, Method, method_class
from models.sparsity import (
    keep_pruned_at_zero,
    kept_count,
    large_sparse_bottleneck,
    masks_of,
    prunable,
    prune_method,
    stored_values,
    task_summary,
)
from models.vlm import TaskSpec, VersatileLM, add_special_token_rows
from tasks.table import TASKS
from utils.data import load_tokenizer
from utils.errors import VLMError
from utils.vocab import GPT2_VOCAB_SIZE, builtin_token_ids

SMALL = BackboneShape(n_layer=12, d_model=768, n_head=12, d_inner=3072)
TINY = BackboneShape(n_layer=2, d_model=64, n_head=4, d_inner=256)
NAMES = ["The Vaults", "The Eagle", "Alimentum", "Zizzi", "Cotto", "Aromi"]
PAIRS = [{"src": f"a man {w}", "tgt": f"ein mann {w}"} for w in ("sleeps", "runs", "reads", "eats", "sits")]


def nlg_records(names):
    return [{"src": {"name": n, "eatType": "pub"}, "tgt": f"{n} is a pub."} for n in names]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse_data")
    (root / "nlg.json").write_text(json.dumps({"train": nlg_records(NAMES), "valid": nlg_records(NAMES[:2]),
                                               "test": nlg_records(NAMES[2:4])}), encoding="utf-8")
    (root / "mt.json").write_text(json.dumps({"train": PAIRS[:4], "test": PAIRS[4:]}), encoding="utf-8")
    return {"nlg": str(root / "nlg.json"), "mt": str(root / "mt.json")}


def model_with(methods, task="nlg", seed=0):
    gpt2 = tiny_gpt2(seed)
    add_special_token_rows(gpt2)
    options = {name: method_class(name).resolve(o) for name, o in methods.items()}
    return VersatileLM(gpt2, [TaskSpec(task, TASKS[task].task_id, builtin_token_ids(task), options)])


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


# --- which tensors, how many ---------------------------------------------------------------------------
# The tensors --sparsity prunes, per method on the tiny model with small options: every weight
# matrix; never a bias, LayerNorm, (1, d) gate row, vector, virtual token or prefix.
PRUNED = {
    "adapter": {f"{i}.project_{w}.weight" for i in range(2) for w in ("down", "up")},
    "houlsby": {f"adapters.{i}_{p}.{w}.weight" for i in range(2) for p in ("attn", "mlp")
                for w in ("down", "up")},
    "parallel": {f"adapters.{i}.{w}.weight" for i in range(2) for w in ("down", "up")},
    "lora": {f"pairs.{i}_{t}.{m}" for i in range(2) for t in ("q", "v", "mlp_fc") for m in "AB"},
    "prefix": set(), "prompt": set(), "ptuning": set(), "ln": set(), "adapterbias": set(),
    # compacter (b 8, n 4): the shared rule and the fast weights with two long sides
    "compacter": {"rule"} | {f"adapters.{i}_{p}.{w}" for i in range(2) for p in ("attn", "mlp")
                             for w in ("down.left", "down.right", "up.left", "up.right")},
    "krona": {f"pairs.{i}_{t}.{m}" for i in range(2) for t in ("q", "v") for m in "AB"},
    "unipelt": ({f"lora.{i}_{t}.{m}" for i in range(2) for t in ("q", "v") for m in "AB"}
                | {f"adapters.{i}.{w}.weight" for i in range(2) for w in ("down", "up")}),
}
TINY_OPTIONS = {
    "adapter": {"bottleneck": 4}, "houlsby": {"bottleneck": 4}, "parallel": {"bottleneck": 4},
    "lora": {"r": 2, "targets": ["q", "v", "mlp_fc"]}, "prefix": {"length": 3, "hidden": 16},
    "prompt": {"length": 4}, "ptuning": {"length": 3, "hidden": 16}, "ln": {}, "adapterbias": {},
    "compacter": {"bottleneck": 8}, "krona": {},
    "unipelt": {"lora_r": 2, "prefix_length": 2, "prefix_hidden": 16, "bottleneck": 4}}


def test_the_table_covers_the_original_methods():
    assert set(PRUNED) <= set(METHODS)


@pytest.mark.parametrize("name", list(PRUNED))
@pytest.mark.parametrize("sparsity", [0.8, 0.5])
def test_each_weight_tensor_keeps_exactly_n_minus_round_s_n_entries(name, sparsity):
    model = model_with({name: TINY_OPTIONS[name]})
    method = model.tasks["nlg"].methods[name]
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    masks = prune_method(method, sparsity, "magnitude", generator())
    assert set(masks) == set(masks_of(method)) == set(prunable(method)) == PRUNED[name]
    params = dict(method.named_parameters())
    for tensor, mask in masks.items():
        n = mask.numel()
        assert int(mask.sum()) == kept_count(n, sparsity) == max(1, n - math.floor(sparsity * n + 0.5))
        assert torch.equal(params[tensor][mask == 0], torch.zeros(n - int(mask.sum()))), tensor
        assert torch.equal(params[tensor][mask == 1], before[tensor][mask == 1]), tensor
    for tensor, value in params.items():  # biases, gains, gates, prefixes: untouched
        if tensor not in masks:
            assert torch.equal(value, before[tensor]), tensor
    pruned = sum(m.numel() - int(m.sum()) for m in masks.values())
    formula = method_class(name).parameter_count(TINY, method.options)
    rows = len(builtin_token_ids("nlg")) * 64
    assert model.count_trainable("adapter", "nlg") == formula - pruned + rows  # the printed count


def test_kept_counts_on_known_sizes():
    assert [kept_count(n, 0.8) for n in (10, 128, 1, 3)] == [2, 26, 1, 1]
    assert [kept_count(n, 0.5) for n in (10, 7, 4096)] == [5, 3, 2048]  # half rounds up: 3.5 -> 4 removed


class OneMatrix(Method):
    """A method of one weight matrix and a bias, for the known cases."""
    name = "one_matrix"

    def __init__(self, weight):
        super().__init__(TINY)
        self.weight = nn.Parameter(torch.tensor(weight))
        self.bias = nn.Parameter(torch.ones(len(weight[0])))


def test_snip_keeps_the_largest_w_times_g_and_magnitude_the_largest_w():
    w = [[1.0, -2.0, 0.5], [3.0, 0.25, -1.5]]
    g = torch.tensor([[4.0, 1.5, -2.0], [-0.1, 8.0, 0.5]])  # |w g| = [[4, 3, 1], [0.3, 2, 0.75]]
    snip = OneMatrix(w)
    snip.weight.grad = g
    mask = prune_method(snip, 0.5, "snip", generator())["weight"]
    assert mask.tolist() == [[1, 1, 0], [0, 1, 0]]
    assert snip.weight.tolist() == [[1.0, -2.0, 0.0], [0.0, 0.25, 0.0]] and snip.bias.tolist() == [1.0] * 3
    magnitude = OneMatrix(w)
    assert prune_method(magnitude, 0.5, "magnitude", generator())["weight"].tolist() == [[0, 1, 0], [1, 0, 1]]
    one = prune_method(OneMatrix(w), 0.5, "random", generator(1))["weight"]
    again = prune_method(OneMatrix(w), 0.5, "random", generator(1))["weight"]
    assert torch.equal(one, again) and int(one.sum()) == 3  # seeded
    others = {tuple(prune_method(OneMatrix(w), 0.5, "random", generator(s))["weight"].flatten().tolist())
              for s in range(8)}
    assert len(others) > 1


def tiny_batch(task_id, seed=3):
    ids = torch.randint(0, GPT2_VOCAB_SIZE, (2, 10), generator=generator(seed))
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "token_type_ids": ids, "labels": labels, "task_ids": torch.full((2,), task_id)}


def test_snip_in_the_engine_scores_the_loss_gradient_of_a_training_batch():
    methods = {"houlsby": {"bottleneck": 4}, "lora": {"r": 2, "dropout": 0.0}}
    model, reference = model_with(methods), model_with(methods).eval()  # the same seeds: the same model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 reference.state_dict().values()))
    model.mark_trainable("adapter", "nlg")
    batch = tiny_batch(TASKS["nlg"].task_id)
    loss = reference(batch["input_ids"], token_type_ids=batch["token_type_ids"], task_ids=batch["task_ids"],
                     labels=batch["labels"]).loss
    weights = {n: p for n, p in reference.tasks["nlg"].methods["houlsby"].named_parameters()
               if n.endswith("weight")}
    grads = dict(zip(weights, torch.autograd.grad(loss, list(weights.values()))))
    args = SimpleNamespace(sparsity=0.75, prune="snip", snip_batches=1, seed=0)
    lines = prune_tasks(model, "nlg", args, [batch], torch.device("cpu"), True)
    assert lines[0] == "pruning: --sparsity 0.75 --prune snip (1 training batch per task)"
    masks = masks_of(model.tasks["nlg"].methods["houlsby"])
    assert set(masks) == set(weights)
    for name, w in weights.items():
        score = (w * grads[name]).abs().flatten()
        expected = torch.zeros(score.numel(), dtype=torch.uint8)
        expected[score.topk(kept_count(score.numel(), 0.75)).indices] = 1
        assert torch.equal(masks[name].flatten(), expected), name
    assert all(p.grad is None for p in model.parameters())  # SNIP's gradient is not left for training
    # LoRA's B starts at zero, so |w g| ties at 0 on B (and A, whose gradient is then 0): random, but exact
    lora = masks_of(model.tasks["nlg"].methods["lora"])
    assert all(int(m.sum()) == kept_count(m.numel(), 0.75) for m in lora.values()) and len(lora) == 8


# --- training keeps the masks -----------------------------------------------------------------------
def test_pruned_entries_stay_exactly_zero_through_adamw_with_weight_decay():
    methods = {"houlsby": {"bottleneck": 4}, "lora": {"r": 2, "dropout": 0.0}, "ln": {}}
    model, control = model_with(methods), model_with(methods)  # control: the same zeros, no masks
    for m in (model, control):
        for p in m.tasks["nlg"].methods.parameters():  # LoRA's B off zero, so every tensor trains
            p.data.add_(0.05 * torch.randn(p.shape, generator=generator(7)))
    parameters = model.mark_trainable("adapter", "nlg")
    masks = {}
    for name, method in model.tasks["nlg"].methods.items():
        masks.update({(name, k): v for k, v in prune_method(method, 0.8, "magnitude", generator()).items()})
    with torch.no_grad():
        for (name, tensor), mask in masks.items():
            dict(control.tasks["nlg"].methods[name].named_parameters())[tensor].mul_(mask)
    optimizer = torch.optim.AdamW(parameters, lr=0.05, weight_decay=0.1)
    keep_pruned_at_zero(optimizer, model)
    control_optimizer = torch.optim.AdamW(control.mark_trainable("adapter", "nlg"), lr=0.05, weight_decay=0.1)
    start = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("tasks.")}
    batch = tiny_batch(TASKS["nlg"].task_id)
    for _ in range(4):
        for m, opt in ((model, optimizer), (control, control_optimizer)):
            m(batch["input_ids"], token_type_ids=batch["token_type_ids"], task_ids=batch["task_ids"],
              labels=batch["labels"]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    state = {id(p): s for p, s in optimizer.state.items()}
    for (name, tensor), mask in masks.items():
        param = dict(model.tasks["nlg"].methods[name].named_parameters())[tensor]
        other = dict(control.tasks["nlg"].methods[name].named_parameters())[tensor]
        pruned = mask == 0
        assert torch.count_nonzero(param[pruned]) == 0, tensor                        # exactly zero
        assert torch.count_nonzero(state[id(param)]["exp_avg"][pruned]) == 0, tensor  # no moments either
        assert torch.count_nonzero(other[pruned]) > 0, tensor                # without the mask they move
        key = f"tasks.nlg.methods.{name}.{tensor}"
        assert torch.count_nonzero(param[~pruned] != start[key][~pruned]) > 0, tensor  # the kept ones train
    ln = model.tasks["nlg"].methods["ln"]
    assert not masks_of(ln)
    assert not torch.equal(ln.norms["0_ln_1"].weight, start["tasks.nlg.methods.ln.norms.0_ln_1.weight"])


def test_pruned_entries_stay_zero_after_steps_even_when_the_optimizer_had_moments_there():
    """Masks fixed after an optimizer already stepped (its AdamW moments are non-zero everywhere):
    the gradient hook cannot clear old moments, the step hook still puts the entries back at 0."""
    methods = {"houlsby": {"bottleneck": 4}}
    runs = {}
    for hooked in (True, False):
        model = model_with(methods)
        optimizer = torch.optim.AdamW(model.mark_trainable("adapter", "nlg"), lr=0.05, weight_decay=0.1)
        batch = tiny_batch(TASKS["nlg"].task_id)

        def step():
            model(batch["input_ids"], token_type_ids=batch["token_type_ids"], task_ids=batch["task_ids"],
                  labels=batch["labels"]).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step()
        masks = prune_method(model.tasks["nlg"].methods["houlsby"], 0.5, "magnitude", generator())
        if hooked:
            keep_pruned_at_zero(optimizer, model)
        step()
        params = dict(model.tasks["nlg"].methods["houlsby"].named_parameters())
        runs[hooked] = sum(int(torch.count_nonzero(params[n][m == 0])) for n, m in masks.items())
    assert runs == {True: 0, False: runs[False]} and runs[False] > 0


# --- checkpoints -------------------------------------------------------------------------------------------
def test_checkpoints_store_values_and_bits_and_load_the_exact_dense_tensors(tmp_path, tiny_base):
    methods = {"houlsby": {"bottleneck": 4}, "lora": {"r": 2}, "unipelt": TINY_OPTIONS["unipelt"]}
    def build():
        return VersatileLM.from_pretrained(tiny_base, [TaskSpec("nlg", 4, builtin_token_ids("nlg"), {
            n: method_class(n).resolve(o) for n, o in methods.items()})])
    model, dense_model = build(), build()
    with torch.no_grad():
        for p in model.tasks["nlg"].methods.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator(2)))
    for method in model.tasks["nlg"].methods.values():
        prune_method(method, 0.8, "magnitude", generator())
    with torch.no_grad():  # the same zeros in a model without masks: stored dense
        for name, method in model.tasks["nlg"].methods.items():
            dense_model.tasks["nlg"].methods[name].load_state_dict(method.state_dict())
    tokenizer = load_tokenizer()
    save_checkpoint(model, tokenizer, str(tmp_path / "sparse"), "adapter", ["nlg"], tiny_base)
    save_checkpoint(dense_model, tokenizer, str(tmp_path / "dense"), "adapter", ["nlg"], tiny_base)

    stored = load_file(tmp_path / "sparse" / "adapters.safetensors")
    dense = load_file(tmp_path / "dense" / "adapters.safetensors")
    summary = json.loads((tmp_path / "sparse" / "vlm_config.json").read_text())["tasks"]["nlg"]["sparsity"]
    assert "sparsity" not in json.loads((tmp_path / "dense" / "vlm_config.json").read_text())["tasks"]["nlg"]
    packed = {k.rsplit(".", 1)[0] for k in stored if k.endswith(".sparse_values")}
    assert len(packed) == summary["pruned_tensors"] == 8 + 8 + 12  # houlsby, lora, unipelt's LoRA + adapter
    assert all(not k.startswith("methods.nlg.unipelt.prefix") for k in packed)
    for key in packed:
        mask = dense[key] != 0  # magnitude over random values: no kept value is 0
        assert torch.equal(stored[key + ".sparse_values"], dense[key][mask])
        assert stored[key + ".sparse_shape"].tolist() == list(dense[key].shape)
        assert stored[key + ".sparse_mask"].numel() == math.ceil(dense[key].numel() / 8)
    assert summary["stored_values"] == sum(stored[k + ".sparse_values"].numel() for k in packed)
    assert summary["dense_values"] == sum(dense[k].numel() for k in packed)
    assert summary["stored_bytes"] == sum(stored[k + s].nbytes for k in packed
                                          for s in (".sparse_values", ".sparse_mask", ".sparse_shape"))
    assert summary["dense_bytes"] == sum(dense[k].nbytes for k in packed)
    sizes = {name: (os.path.getsize(tmp_path / name / "adapters.safetensors"),
                    data_bytes(tmp_path / name / "adapters.safetensors")) for name in ("sparse", "dense")}
    assert sizes["dense"][1] - sizes["sparse"][1] == summary["dense_bytes"] - summary["stored_bytes"]
    assert sizes["sparse"][0] < sizes["dense"][0]  # the whole file too, its longer header included

    loaded, _, _ = load_checkpoint(str(tmp_path / "sparse"))
    again, _, _ = load_checkpoint(str(tmp_path / "dense"))
    assert loaded.state_dict().keys() == again.state_dict().keys()
    for key, value in again.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    for name, method in model.tasks["nlg"].methods.items():
        got = masks_of(loaded.tasks["nlg"].methods[name])
        assert got.keys() == masks_of(method).keys()
        assert all(torch.equal(got[k], v) for k, v in masks_of(method).items())
    assert not any(masks_of(m) for m in again.tasks["nlg"].methods.values())


def data_bytes(path):
    """Bytes of a safetensors file's tensor data (after its 8-byte length and JSON header)."""
    with open(path, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return os.path.getsize(path) - 8 - header


@pytest.mark.parametrize("damage, message", [
    (lambda t, k: t.pop(k + ".sparse_mask"), "lacks 'methods.nlg.lora.pairs.0_q.A.sparse_mask'"),
    (lambda t, k: t.__setitem__(k + ".sparse_values", t[k + ".sparse_values"][:-1]), "kept values"),
    (lambda t, k: t.__setitem__(k + ".sparse_mask", t[k + ".sparse_mask"][:-1]), "uint8 bytes"),
    (lambda t, k: t.__setitem__(k + ".sparse_shape", torch.tensor([2, 65])), "uint8 bytes"),
])
def test_damaged_packed_tensors_are_one_error_naming_the_file(tmp_path, tiny_base, damage, message):
    model = VersatileLM.from_pretrained(tiny_base, [TaskSpec("nlg", 4, builtin_token_ids("nlg"),
                                                             {"lora": method_class("lora").resolve({})})])
    prune_method(model.tasks["nlg"].methods["lora"], 0.5, "random", generator())
    save_checkpoint(model, load_tokenizer(), str(tmp_path), "adapter", ["nlg"], tiny_base)
    path = tmp_path / "adapters.safetensors"
    tensors = load_file(path)
    damage(tensors, "methods.nlg.lora.pairs.0_q.A")
    save_file(tensors, path)
    with pytest.raises(VLMError, match=f"{re.escape(str(path))}: .*{re.escape(message)}"):
        load_checkpoint(str(tmp_path))


# --- train.py, evaluate.py, --resume ------------------------------------------------------------------
SPARSE_METHOD = ["--method", "houlsby+lora", "--houlsby_bottleneck", "8", "--lora_r", "4"]


def train_argv(tmp_path, data, base, out, *extra, task="nlg", method=SPARSE_METHOD):
    return ["--task", task, "--dataset_path", data[task], "--dataset_cache", str(tmp_path / "cache"),
            "--model_checkpoint", base, "--device", "cpu", "--output_dir", str(tmp_path / out),
            "--train_batch_size", "2", "--valid_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--n_epochs", "2", "--lr", "5e-2", *method, "--eval_before_start", *extra]


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory, data, tiny_base):
    """train.py --method houlsby+lora --sparsity 0.8 (SNIP), and its printed lines."""
    tmp_path = tmp_path_factory.mktemp("sparse_run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = training.run_training(train.parse_args(train_argv(tmp_path, data, tiny_base, "run",
                                                                   "--sparsity", "0.8")))
    return result, out.getvalue(), tmp_path


def test_train_py_prunes_trains_and_saves_compactly(sparse_run, tiny_base):
    result, printed, _ = sparse_run
    model = result.model
    methods = model.tasks["nlg"].methods
    summary = task_summary(model.tasks["nlg"])
    assert "pruning: --sparsity 0.8 --prune snip (1 training batch per task)" in printed
    assert (f"nlg: 16 pruned weight tensors, {summary['stored_values']:,} of {summary['dense_values']:,} "
            f"values stored") in printed
    dense_count = sum(method_class(n).parameter_count(BackboneShape.of(model.config), m.options)
                      for n, m in methods.items())
    pruned = summary["dense_values"] - summary["stored_values"]
    rows = len(builtin_token_ids("nlg")) * 64
    assert f"trainable parameters: {dense_count - pruned + rows:,} (" in printed
    for method in methods.values():
        params = dict(method.named_parameters())
        for name, mask in masks_of(method).items():
            assert int(mask.sum()) == kept_count(mask.numel(), 0.8), name
            assert torch.count_nonzero(params[name][mask == 0]) == 0, name  # after every step of 2 epochs
    assert result.metrics[-1]["val_nll"] < result.metrics[0]["val_nll"] - 0.05  # it learned

    base = VersatileLM.from_pretrained(tiny_base)  # the frozen backbone: unchanged but the task's own rows
    own = sorted(TASKS["nlg"].token_ids())
    trained = model.gpt2.state_dict()
    for name, tensor in base.gpt2.state_dict().items():
        if name in ("transformer.wte.weight", "lm_head.weight"):
            others = [i for i in range(tensor.shape[0]) if i not in own]
            assert torch.equal(trained[name][others], tensor[others]), name
        else:
            assert torch.equal(trained[name], tensor), name

    config = json.load(open(os.path.join(result.output_dir, "vlm_config.json")))
    assert config["tasks"]["nlg"]["sparsity"] == summary and summary["sparsity"] > 0.79
    assert config["training_args"]["sparsity"] == 0.8 and config["training_args"]["prune"] == "snip"
    loaded, _, _ = load_checkpoint(result.output_dir)
    ids = torch.randint(0, GPT2_VOCAB_SIZE, (2, 9), generator=generator(4))
    with torch.no_grad():
        expected = model.eval()(ids, token_type_ids=ids, task_ids=TASKS["nlg"].task_id).logits
        assert torch.equal(loaded(ids, token_type_ids=ids, task_ids=TASKS["nlg"].task_id).logits, expected)


def test_evaluate_decodes_a_sparse_checkpoint(sparse_run, data, tmp_path, capsys):
    result, _, _ = sparse_run
    evaluate.main(["--task", "nlg", "--model_checkpoint", result.output_dir, "--dataset_path", data["nlg"],
                   "--dataset_cache", str(tmp_path / "cache"), "--device", "cpu", "--no_sample",
                   "--max_length", "3", "--output_dir", str(tmp_path / "results")])
    lines = (tmp_path / "results" / "nlg_output.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2


def test_resume_keeps_the_masks_and_ends_with_the_same_weights(sparse_run, data, tiny_base, capsys):
    result, _, tmp_path = sparse_run
    part = tmp_path / "resumed"
    shutil.copytree(result.output_dir, part)
    for name in ("adapters.safetensors", "vlm_config.json"):
        (part / name).unlink()
    shutil.rmtree(part / "checkpoint_epoch2")
    epoch1 = load_file(part / "checkpoint_epoch1" / "adapters.safetensors")
    assert any(k.endswith(".sparse_mask") for k in epoch1)  # epoch checkpoints are packed too
    capsys.readouterr()
    resumed = training.run_training(train.parse_args(train_argv(tmp_path, data, tiny_base, "resumed",
                                                                "--sparsity", "0.8", "--resume")))
    printed = capsys.readouterr().out
    assert "pruning:" not in printed and "nlg: 16 pruned weight tensors" in printed  # not pruned again
    a = load_file(os.path.join(result.output_dir, "adapters.safetensors"))
    b = load_file(os.path.join(resumed.output_dir, "adapters.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(VLMError, match="--resume: .* was trained with --sparsity 0.8, not 0.5"):
        training.run_training(train.parse_args(train_argv(tmp_path, data, tiny_base, "resumed",
                                                          "--sparsity", "0.5", "--resume")))


# --- combined, mixed and multi-task ---------------------------------------------------------------
def test_a_sparse_task_combines_and_decodes_as_its_own_checkpoint_in_mixed_batches(sparse_run, data,
                                                                                  tiny_base, tmp_path):
    nlg, _, _ = sparse_run
    mt = training.run_training(train.parse_args(train_argv(tmp_path, data, tiny_base, "mt", task="mt",
                                                           method=["--method", "houlsby"])))
    out = tmp_path / "vlm"
    manifest = write_vlm(combine(load_task_checkpoints([nlg.output_dir, mt.output_dir])), str(out),
                         log=None)  # verifies: logits equal to each source's, bit for bit
    combined_file = load_file(out / "adapters.safetensors")
    single_file = load_file(os.path.join(nlg.output_dir, "adapters.safetensors"))
    nlg_keys = {k for k in single_file if k.startswith("methods.nlg.")}
    assert nlg_keys <= set(combined_file) and any(k.endswith(".sparse_values") for k in nlg_keys)
    assert all(torch.equal(combined_file[k], single_file[k]) for k in nlg_keys)  # stored as compactly
    config = json.loads((out / "vlm_config.json").read_text())
    assert config["tasks"]["nlg"]["sparsity"] == json.loads(
        open(os.path.join(nlg.output_dir, "vlm_config.json")).read())["tasks"]["nlg"]["sparsity"]
    assert "sparsity" not in config["tasks"]["mt"]
    entries = {t["name"]: t for t in manifest["tasks"]}
    summary = config["tasks"]["nlg"]["sparsity"]
    assert entries["nlg"]["sparsity"] == summary and "sparsity" not in entries["mt"]
    assert entries["nlg"]["bytes"] == 4 * entries["nlg"]["parameters"] - summary["dense_bytes"] + summary[
        "stored_bytes"]

    combined, tokenizer, _ = load_checkpoint(str(out))
    options = DecodingOptions(max_length=5, no_sample=True)
    prompts, alone = [], []
    for task, run in (("nlg", nlg), ("mt", mt)):
        single = load_checkpoint(run.output_dir)[0]
        records = TASKS[task].load_data(data[task], tokenizer, ["test"])["test"]
        alone += generate(single, TASKS[task].dataset_prompts(records, 0, tokenizer, single.task_id(task)),
                          options, progress=False)
        prompts += TASKS[task].dataset_prompts(records, 0, tokenizer, combined.task_id(task))
    assert len({p.task_id for p in prompts}) == 2
    assert generate(combined, prompts, options, batch_size=8, progress=False) == alone  # one mixed batch


def test_train_vlm_prunes_every_task_that_has_weight_matrices(data, tiny_base, tmp_path, capsys):
    argv = ["--tasks", "mt", "nlg", "--dataset_paths", *(f"{t}={p}" for t, p in data.items()),
            "--dataset_cache", str(tmp_path / "cache"), "--model_checkpoint", tiny_base, "--device", "cpu",
            "--output_dir", str(tmp_path / "out"), "--train_batch_size", "2", "--valid_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--n_epochs", "1", "--lr", "1e-2",
            "--method", "lora", "nlg=prefix+krona", "--prefix_length", "3", "--prefix_hidden", "8",
            "--sparsity", "0.6", "--prune", "random"]
    result = multitask.run_multitask(train_vlm.parse_args(argv))
    printed = capsys.readouterr().out
    assert "pruning: --sparsity 0.6 --prune random\n" in printed
    assert "mt: 8 pruned weight tensors" in printed and "nlg: 8 pruned weight tensors" in printed
    model = result.model
    assert not masks_of(model.tasks["nlg"].methods["prefix"])
    for task in ("mt", "nlg"):
        for method in model.tasks[task].methods.values():
            params = dict(method.named_parameters())
            for name, mask in masks_of(method).items():
                assert int(mask.sum()) == kept_count(mask.numel(), 0.6), (task, name)
                assert torch.count_nonzero(params[name][mask == 0]) == 0, (task, name)
    loaded, _, config = load_checkpoint(result.output_dir)
    assert {t: e["sparsity"]["pruned_tensors"] for t, e in config["tasks"].items()} == {"mt": 8, "nlg": 8}
    for task in ("mt", "nlg"):
        for name, method in model.tasks[task].methods.items():
            got = masks_of(loaded.tasks[task].methods[name])
            assert got.keys() == masks_of(method).keys() and all(torch.equal(got[k], v)
                                                                 for k, v in masks_of(method).items())


# --- Large-Sparse -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, bottleneck, sparsity, shape", [
    ("adapter", 100, 0.8, SMALL), ("houlsby", 48, 0.5, SMALL), ("compacter", 8, 0.75, TINY),
    ("adapter", 8, 0.75, TINY)])
def test_large_sparse_bottleneck_stores_as_many_values_as_the_dense_one(name, bottleneck, sparsity, shape):
    cls = method_class(name)
    dense = stored_values(name, shape, cls.resolve({"bottleneck": bottleneck}), 0)
    wide = large_sparse_bottleneck(name, shape, {"bottleneck": bottleneck}, sparsity)
    step = 4 if name == "compacter" else 1  # compacter's bottleneck is a multiple of its phm_dim

    def stored(b):
        return stored_values(name, shape, cls.resolve({"bottleneck": b}), sparsity)
    assert wide > bottleneck / (1 - sparsity) * 0.8 and wide % step == 0
    # the closest to the dense count: equal up to one step of the bottleneck (rounding)
    assert abs(stored(wide) - dense) <= abs(stored(wide + step) - dense)
    assert abs(stored(wide) - dense) <= abs(stored(wide - step) - dense)
    assert abs(stored(wide) - dense) <= (stored(wide + step) - stored(wide - step)) / 2


def test_large_sparse_counts_are_what_a_pruned_checkpoint_stores(tmp_path, tiny_base):
    wide = large_sparse_bottleneck("houlsby", TINY, {"bottleneck": 8}, 0.75)
    model = VersatileLM.from_pretrained(tiny_base, [TaskSpec("nlg", 4, (), {
        "houlsby": method_class("houlsby").resolve({"bottleneck": wide})})])
    prune_method(model.tasks["nlg"].methods["houlsby"], 0.75, "magnitude", generator())
    save_checkpoint(model, load_tokenizer(), str(tmp_path), "adapter", ["nlg"], tiny_base)
    stored = load_file(tmp_path / "adapters.safetensors")
    values = sum(v.numel() for k, v in stored.items() if not k.endswith((".sparse_mask", ".sparse_shape")))
    def stored(b, sparsity):
        return stored_values("houlsby", TINY, method_class("houlsby").resolve({"bottleneck": b}), sparsity)
    assert values == stored(wide, 0.75) == task_summary(model.tasks["nlg"])["stored_values"] + sum(
        p.numel() for n, p in model.tasks["nlg"].methods["houlsby"].named_parameters() if n.endswith("bias"))
    # the dense bottleneck-8 count, up to half a step of the bottleneck
    assert abs(values - stored(8, 0)) <= (stored(wide + 1, 0.75) - stored(wide - 1, 0.75)) / 2


def test_the_large_sparse_command_prints_the_bottleneck(tiny_base):
    done = run_script("-m", "models.sparsity", "--method", "houlsby", "--bottleneck", "8", "--sparsity",
                      "0.75", "--model_checkpoint", tiny_base, env={"HF_HUB_OFFLINE": "1"})
    wide = large_sparse_bottleneck("houlsby", TINY, {"bottleneck": 8}, 0.75)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"houlsby: bottleneck {wide} at sparsity 0.75 stores ")


# --- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--method", "lora", "--sparsity", "1"], "--sparsity must be in (0, 1)"),
    (["--method", "lora", "--sparsity", "0"], "--sparsity must be in (0, 1)"),
    (["--method", "lora", "--prune", "magnitude"], "--prune magnitude chooses what --sparsity prunes"),
    (["--method", "lora", "--sparsity", "0.5", "--prune", "random", "--snip_batches", "2"],
     "--snip_batches 2 is for --prune snip"),
    (["--sparsity", "0.5"], "--sparsity 0.5 prunes per-task method weights on a frozen backbone; this run "
                            "trains all of GPT-2"),
    (["--emb_only", "--sparsity", "0.5"], "this run trains only the task embeddings"),
    (["--method", "prefix+ln", "--sparsity", "0.5"], "--method prefix+ln: no weight matrices to prune"),
    (["--method", "lora", "--sparsity", "0.5", "--prune", "gradient"], "invalid choice: 'gradient'"),
])
def test_bad_pruning_flags_are_one_error_line(tmp_path, data, tiny_base, extra, message):
    argv = ["train.py", "--task", "nlg", "--dataset_path", data["nlg"], "--model_checkpoint", tiny_base,
            "--device", "cpu", "--output_dir", str(tmp_path / "out"), "--n_epochs", "1",
            "--dataset_cache", str(tmp_path / "cache"), *extra]
    done = run_script(*argv, env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_the_help_says_what_is_pruned():
    text = train.build_parser().format_help()
    for words in ("--sparsity S", "--prune {snip,magnitude,random}", "never biases", "virtual tokens",
                  "python -m models.sparsity"):
        assert words in " ".join(text.split()), words
