"""poly (models/poly.py, engines/poly.py): Polytropon and multi-head routing as a cross-task method.
Counts by the papers' formula, PEFT's initialization and logits (eval: sigmoid routing; training:
the same relaxed-Bernoulli draws), the exact export to per-task LoRA, mixed batches, train_vlm.py
runs (backbone untouched, own tensors only, --resume after SIGKILL), train.py over a frozen
inventory (route / average), combine_all.py on exported tasks, and one-line errors."""
import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import REPO, popen_script, sigkill_after_first_checkpoint
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import combine_all
import train
import train_vlm
from engines import multitask, training
from engines.steps import attach_lr_schedule
from models.checkpoint import load_checkpoint, save_checkpoint
from models.combine import sample_inputs, task_logits
from models.methods import BackboneShape
from models.methods.lora import LoRAMethod
from models.poly import Poly, PolyTask, SkillInventory, install, mix, pair_shapes
from models.vlm import TaskSpec, VersatileLM, add_special_token_rows, backbone_fingerprint
from tasks.table import TASKS
from utils.data import IGNORE_INDEX, load_tokenizer
from utils.vocab import GPT2_VOCAB_SIZE, builtin_token_ids

SMALL = BackboneShape(n_layer=12, d_model=768, n_head=12, d_inner=3072)
IDS = torch.randint(0, 50257, (3, 10), generator=torch.Generator().manual_seed(5))
TASK_IDS = {"mt": 2, "nlg": 4, "dialogue": 0, "summarization": 3}
LORA_DEFAULT = {"r": 8, "alpha": 1.0, "dropout": 0.0, "targets": ["q", "v"]}
NLG_NAMES = ["The Vaults", "The Eagle", "Alimentum", "Zizzi", "Cotto", "Aromi", "Wildwood", "Strada"]
MT_PAIRS = [("a dog runs .", "ein hund rennt ."), ("a man sleeps .", "ein mann schläft ."),
            ("two cats eat fish .", "zwei katzen essen fisch ."), ("the sun shines .", "die sonne scheint ."),
            ("children play outside .", "kinder spielen draußen ."), ("a woman reads .", "eine frau liest .")]


# --- helpers (poly_ prefixed: conftest.py is shared) -----------------------------------------------
def poly_gpt2():
    """The tiny GPT-2 with its own dropout off, so training-mode forwards draw only routing samples."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=512, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    add_special_token_rows(gpt2)
    return gpt2


def poly_model(options, tasks=("mt", "nlg"), extra=(), gpt2=None, scale=0.3):
    """A VersatileLM whose `tasks` are poly over one inventory (every tensor moved off init, so
    comparisons can fail), plus `extra` TaskSpecs; returns (model, inventory, {task: PolyTask})."""
    options = Poly.resolve(options)
    specs = [TaskSpec(t, TASK_IDS[t], builtin_token_ids(t), {"lora": Poly.lora_options(options)})
             for t in tasks]
    model = VersatileLM(gpt2 if gpt2 is not None else poly_gpt2(), specs + list(extra)).eval()
    inventory, views = install(model, list(tasks), options)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        tasks_tensors = [p for t in model.tasks.values() for p in t.methods.parameters()]
        for p in [*inventory.parameters(), *tasks_tensors]:
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model, inventory, views


def linear_of(conv):
    linear = nn.Linear(*conv.weight.shape)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return linear


class QKV(nn.Module):
    """GPT-2's fused c_attn as three nn.Linear (PEFT's poly adapts nn.Linear only)."""

    def __init__(self, conv):
        super().__init__()
        d = conv.weight.shape[0]
        for i, name in enumerate("qkv"):
            linear = nn.Linear(d, d)
            with torch.no_grad():
                linear.weight.copy_(conv.weight[:, i * d:(i + 1) * d].t())
                linear.bias.copy_(conv.bias[i * d:(i + 1) * d])
            setattr(self, name, linear)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


PEFT_PATHS = {"q": "attn.c_attn.q", "k": "attn.c_attn.k", "v": "attn.c_attn.v", "attn_proj": "attn.c_proj",
              "mlp_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"}


def peft_poly(gpt2, options, inventory, views):
    """HF PEFT's PolyModel on the same GPT-2 (projections as nn.Linear), holding our skills and
    routers (PEFT task i = views' i-th task)."""
    import peft
    for block in gpt2.transformer.h:
        block.attn.c_attn, block.attn.c_proj = QKV(block.attn.c_attn), linear_of(block.attn.c_proj)
        block.mlp.c_fc, block.mlp.c_proj = linear_of(block.mlp.c_fc), linear_of(block.mlp.c_proj)
    pattern = r".*\.(" + "|".join(PEFT_PATHS[t].replace(".", r"\.") for t in options["targets"]) + ")"
    config = peft.PolyConfig(task_type="CAUSAL_LM", r=options["r"], n_tasks=len(views),
                             n_skills=options["skills"], n_splits=options["splits"], target_modules=pattern)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(gpt2, config).eval()
    with torch.no_grad():
        for key, _, _ in pair_shapes(BackboneShape.of(gpt2.config), options["targets"]):
            layer, target = key.split("_", 1)
            module = model.base_model.model.transformer.h[int(layer)]
            for part in PEFT_PATHS[target].split("."):
                module = getattr(module, part)
            module.poly_lora_A["default"].copy_(inventory.A[key])
            module.poly_lora_B["default"].copy_(inventory.B[key])
            for i, view in enumerate(views.values()):
                module.poly_router["default"].module_logits[i].copy_(view.router[view.pair_index[key]].reshape(-1))
    return model


def peft_forward(model, ids, task_index):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=ids, task_ids=torch.full((len(ids),), task_index)).logits


# --- the method: sizes, initialization, agreement with PEFT, export --------------------------------
@pytest.mark.parametrize("options, n_tasks, formula", [
    ({}, 3, 12 * 2 * (4 * 8 * (768 + 768) + 3 * 1 * 4)),                          # q, v; Polytropon
    ({"splits": 8, "skills": 6, "r": 4, "targets": ["q", "k", "v", "attn_proj", "mlp_fc", "mlp_proj"]}, 5,
     12 * (6 * 4 * (4 * (768 + 768) + (768 + 3072) + (3072 + 768)) + 6 * 5 * 8 * 6)),   # MHR on all six
])
def test_parameter_counts_equal_the_papers_formula(options, n_tasks, formula):
    """skills x (per-skill LoRA parameters) + tasks x splits x skills router logits, per projection."""
    options = Poly.resolve(options)
    with torch.device("meta"):
        inventory = SkillInventory(SMALL, options)
        routers = [PolyTask(SMALL, options, inventory) for _ in range(n_tasks)]
    counted = sum(p.numel() for p in [*inventory.parameters(), *(p for r in routers for p in r.parameters())])
    assert counted == Poly.parameter_count(SMALL, options, n_tasks) == formula
    assert routers[0].options == Poly.lora_options(options)  # a task is saved as this LoRA: one skill's size
    assert sum(p.numel() for p in inventory.parameters()) == \
        options["skills"] * LoRAMethod.parameter_count(SMALL, routers[0].options)


def test_the_inventory_and_routers_start_as_peft_initializes_them():
    """The same seed gives PEFT's PolyLayer and ours the same skills (A: nn.Linear's draw per skill
    and split, transposed; B: zero) and the same router logits (U(-1e-3, 1e-3), task by task)."""
    from peft import PolyConfig
    from peft.tuners.poly.layer import Linear as PeftPolyLinear
    options = Poly.resolve({"skills": 3, "r": 4, "splits": 2, "targets": ["q"]})
    base = nn.Linear(64, 64)
    torch.manual_seed(7)
    theirs = PeftPolyLinear(base, "default", PolyConfig(r=4, n_tasks=2, n_skills=3, n_splits=2))
    shape = BackboneShape(n_layer=1, d_model=64, n_head=4, d_inner=256)
    torch.manual_seed(7)
    inventory = SkillInventory(shape, options)
    routers = [PolyTask(shape, options, inventory).router for _ in range(2)]
    assert torch.equal(inventory.A["0_q"], theirs.poly_lora_A["default"])
    assert torch.equal(inventory.B["0_q"], theirs.poly_lora_B["default"]) and not inventory.B["0_q"].any()
    assert torch.equal(torch.stack(routers).reshape(2, -1), theirs.poly_router["default"].module_logits)
    assert 0 < torch.stack(routers).abs().max() <= 1e-3
    assert inventory.A["0_q"].abs().max() <= 1 / (64 / 2) ** 0.5  # kaiming bound of an (r, in/S) draw


@pytest.mark.parametrize("options", [
    {"skills": 3, "r": 4, "splits": 1, "targets": ["q", "v", "mlp_fc"]},                    # Polytropon
    {"skills": 3, "r": 4, "splits": 4, "targets": ["q", "v", "attn_proj", "mlp_proj"]},     # MHR
])
def test_logits_agree_with_peft_poly_in_eval_and_in_training(options):
    """PEFT's PolyModel holding our skills and routers: per task, eval logits (sigmoid routing)
    agree to 1e-5, and training-mode logits too when both draw their relaxed-Bernoulli routing
    from the same seed (one sample per row and projection, in forward order)."""
    gpt2 = poly_gpt2()
    reference = copy.deepcopy(gpt2)
    model, inventory, views = poly_model(options, gpt2=gpt2)
    reference = peft_poly(reference, Poly.resolve(options), inventory, views)
    with torch.no_grad():
        plain = model(IDS, task_ids=-1).logits
        for index, task in enumerate(views):
            ours = model(IDS, task_ids=TASK_IDS[task]).logits
            torch.testing.assert_close(ours, peft_forward(reference, IDS, index), rtol=0, atol=1e-5)
            assert (ours - plain).abs().max() > 1e-2, task  # the mixture is not nothing
        model.train()
        reference.train()
        for index, task in enumerate(views):
            torch.manual_seed(11)
            ours = model(IDS, task_ids=TASK_IDS[task]).logits
            torch.manual_seed(11)
            torch.testing.assert_close(ours, peft_forward(reference, IDS, index), rtol=0, atol=1e-5)
            torch.manual_seed(12)
            assert (ours - model(IDS, task_ids=TASK_IDS[task]).logits).abs().max() > 1e-3  # stochastic


def test_the_export_is_per_task_lora_with_the_trained_logits_exactly(tmp_path, tokenizer, tiny_base):
    """Eval-mode logits of the trained form (mixed batch and each task alone) equal the exported
    LoRA's bit for bit, in memory and after a save and load as an ordinary lora checkpoint."""
    model, inventory, views = poly_model({"skills": 3, "r": 4, "splits": 2, "targets": ["q", "v", "mlp_fc"]})
    tids = torch.tensor([2, 4, -1])
    with torch.no_grad():
        mixed = model(IDS, task_ids=tids).logits
        alone = {t: model(IDS, task_ids=TASK_IDS[t]).logits for t in views}
    state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("tasks.")}
    save_checkpoint(model, tokenizer, str(tmp_path / "ckpt"), "adapter", ["mt", "nlg"], tiny_base)
    model.export_methods()
    assert all(type(model.tasks[t].methods["lora"]) is LoRAMethod for t in views)
    assert {k: v for k, v in model.state_dict().items() if k.startswith("tasks.")}.keys() == state.keys()
    for key, value in model.state_dict().items():
        if key in state:
            assert torch.equal(value, state[key]), key  # the trained form's state_dict is the exported LoRA
    with torch.no_grad():
        assert torch.equal(model(IDS, task_ids=tids).logits, mixed)
        for task in views:
            assert torch.equal(model(IDS, task_ids=TASK_IDS[task]).logits, alone[task])
    config = json.loads((tmp_path / "ckpt" / "vlm_config.json").read_text())
    assert {t: e["methods"] for t, e in config["tasks"].items()} == {
        t: {"lora": {"r": 4, "alpha": 1.0, "dropout": 0.0, "targets": ["q", "v", "mlp_fc"]}} for t in views}
    tensors = load_file(str(tmp_path / "ckpt" / "adapters.safetensors"))
    assert {k.split(".")[0] for k in tensors} == {"task_embeddings", "methods"}
    assert all(".lora.pairs." in k for k in tensors if k.startswith("methods."))
    assert not any("router" in k or "inventory" in k for k in tensors)
    loaded, _, _ = load_checkpoint(str(tmp_path / "ckpt"))  # tiny_base: the same weights and fingerprint
    with torch.no_grad():
        assert torch.equal(loaded(IDS, task_ids=tids).logits, mixed)


def test_rows_of_poly_lora_and_plain_tasks_in_one_batch_equal_each_row_alone():
    dialogue = TaskSpec("dialogue", 0, builtin_token_ids("dialogue"), {"lora": {"r": 2, "dropout": 0.0}})
    model, _, _ = poly_model({"splits": 2, "targets": ["q", "v"]}, extra=[dialogue])
    tids = torch.tensor([2, 0, -1, 4, 4, 2])
    ids = IDS.repeat(2, 1)
    with torch.no_grad():
        mixed = model(ids, task_ids=tids).logits
        for row, task in enumerate(tids.tolist()):
            alone = model(ids[row:row + 1], task_ids=task).logits[0]
            torch.testing.assert_close(mixed[row], alone, rtol=0, atol=1e-5)


def test_mixed_batch_gradients_equal_per_task_sub_batches_and_reach_only_own_routers():
    """Eval-mode routing (deterministic): the gradients of a mixed batch equal the sum of each
    task's sub-batch alone. Training-mode routing: rows of one task move its router and the shared
    skills only, never another task's router or a lora task's tensors."""
    dialogue = TaskSpec("dialogue", 0, builtin_token_ids("dialogue"), {"lora": {"r": 2, "dropout": 0.0}})
    model, inventory, views = poly_model({"splits": 2, "targets": ["q", "mlp_proj"]}, extra=[dialogue])
    model.mark_trainable("adapter", ["mt", "nlg", "dialogue"])
    inventory.requires_grad_(True)
    tids = torch.tensor([2, 4, -1, 0, 2, 4])
    ids = IDS.repeat(2, 1)
    named = dict(model.named_parameters())  # the inventory's tensors are poly_inventory.*

    def gradients(ids, tids):
        model.zero_grad(set_to_none=True)
        model(ids, token_type_ids=ids, task_ids=tids, labels=ids).loss.backward()
        return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in named.items()
                if n.startswith("poly_inventory.") or ".methods." in n}
    mixed = gradients(ids, tids)
    n_labels = {t: (ids[tids == t, 1:]).numel() for t in (2, 4, 0, -1)}  # the loss is the token mean
    summed = {}
    for task_id in (2, 4, 0):
        rows = (tids == task_id).nonzero().flatten()
        for name, grad in gradients(ids[rows], tids[rows]).items():  # a sub-batch's mean -> its share
            summed[name] = summed.get(name, 0) + grad * n_labels[task_id] / sum(n_labels.values())
    assert {n for n, g in mixed.items() if g.abs().max() > 0} == set(mixed)
    for name, grad in mixed.items():
        torch.testing.assert_close(grad, summed[name], rtol=1e-4, atol=1e-7)

    model.train()
    labels = ids.clone()
    labels[tids != 2] = IGNORE_INDEX  # only mt's rows are scored
    model.zero_grad(set_to_none=True)
    model(ids, token_type_ids=ids, task_ids=tids, labels=labels).loss.backward()
    assert views["mt"].router.grad.abs().max() > 0
    assert all(p.grad.abs().max() > 0 for p in inventory.parameters())
    assert views["nlg"].router.grad is None or not views["nlg"].router.grad.any()
    assert all(p.grad is None or not p.grad.any() for p in model.tasks["dialogue"].methods.parameters())


def test_router_groups_follow_the_schedule_at_their_own_rate():
    from ignite.engine import Engine, Events
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr": 0.1, "lr_scale": 100.0}], lr=1e-3)
    seen = []
    trainer = Engine(lambda engine, batch: None)
    attach_lr_schedule(trainer, optimizer, 1e-3, 4)
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: seen.append(
        [g["lr"] for g in optimizer.param_groups]))
    trainer.run([0, 1], max_epochs=2)
    expected = [rate * f for f in (1.0, 0.75, 0.5, 0.25) for rate in (1e-3, 0.1)]
    assert [lr for step in seen for lr in step] == pytest.approx(expected, rel=1e-12)


# --- train_vlm.py runs ---------------------------------------------------------------------------
def poly_nlg(names):
    kinds = ("pub", "restaurant")
    return [{"src": {"name": n, "eatType": kinds[i % 2]}, "tgt": f"{n} is a {kinds[i % 2]}."}
            for i, n in enumerate(names)]


def poly_data(folder, copies=1):
    """{task: path}: nlg, mt (validated on test) and summarization (for a new task's run)."""
    names = [f"{n}{i or ''}" for i in range(copies) for n in NLG_NAMES]
    pairs = [{"src": f"{s} {i}" if i else s, "tgt": f"{t} {i}" if i else t} for i in range(copies)
             for s, t in MT_PAIRS]
    paths = {"nlg": folder / "nlg.json", "mt": folder / "mt.json", "summarization": folder / "sm.json"}
    paths["nlg"].write_text(json.dumps({"train": poly_nlg(names[:-2]), "valid": poly_nlg(names[-2:])}))
    paths["mt"].write_text(json.dumps({"train": pairs[:-2], "test": pairs[-2:]}, ensure_ascii=False))
    paths["summarization"].write_text(json.dumps({"train": pairs[2:], "valid": pairs[:2]},
                                                 ensure_ascii=False))
    return {task: str(path) for task, path in paths.items()}


def poly_vlm_argv(folder, data, base, *extra, out="out"):
    return ["--tasks", "mt", "nlg", "--dataset_paths", f"mt={data['mt']}", f"nlg={data['nlg']}",
            "--dataset_cache", str(folder / "cache"), "--model_checkpoint", base, "--device", "cpu",
            "--output_dir", str(folder / out), "--train_batch_size", "2", "--valid_batch_size", "2",
            "--gradient_accumulation_steps", "1", *extra]


def poly_train_argv(folder, data, base, *extra, out):
    return ["--task", "summarization", "--dataset_path", data["summarization"], "--dataset_cache",
            str(folder / "cache"), "--model_checkpoint", base, "--device", "cpu",
            "--output_dir", str(folder / out), "--train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--lr", "1e-2", *extra]


def exact_nll(model, task_name, path):
    task = TASKS[task_name]
    split = task.splits[1]
    examples = task.training_examples(task.load_data(path, load_tokenizer(), splits=[split])[split],
                                      task.max_history, max_positions=512)
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            loss = model(torch.tensor([e["input_ids"]]), token_type_ids=torch.tensor([e["token_type_ids"]]),
                         task_ids=task.task_id, labels=torch.tensor([e["labels"]])).loss.item()
            n = sum(1 for label in e["labels"][1:] if label != IGNORE_INDEX)
            total, count = total + loss * n, count + n
    return total / count


@pytest.fixture(scope="module")
def poly_run(tmp_path_factory, tiny_base):
    """One train_vlm.py --method poly run (MHR, 2 splits) on mt and nlg in mixed batches:
    (folder, data, args, TrainResult, stdout)."""
    folder = tmp_path_factory.mktemp("poly")
    data = poly_data(folder)
    args = train_vlm.parse_args(poly_vlm_argv(folder, data, tiny_base, "--n_epochs", "3", "--lr", "1e-2",
                                              "--method", "poly", "--poly_splits", "2",
                                              "--eval_before_start"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = multitask.run_multitask(args)
    return folder, data, args, result, out.getvalue()


def test_train_vlm_trains_poly_across_tasks_and_saves_each_task_as_lora(poly_run, tiny_base):
    folder, data, args, result, stdout = poly_run
    out = folder / "out"
    options = Poly.resolve({"splits": 2})
    assert args.poly == {"tasks": ["mt", "nlg"], **options, "inventory": None, "inventory_mode": None}
    assert args.methods == {t: {"lora": LORA_DEFAULT} for t in ("mt", "nlg")}
    rows = sum(len(TASKS[t].special_tokens) for t in ("mt", "nlg")) * 64
    shape = BackboneShape(n_layer=2, d_model=64, n_head=4, d_inner=256)
    assert f"trainable parameters: {Poly.parameter_count(shape, options, 2) + rows:,} (" in stdout
    # the backbone and every other task's rows untouched
    base = VersatileLM.from_pretrained(tiny_base)
    trained = result.model.gpt2.state_dict()
    for name, tensor in base.gpt2.state_dict().items():
        if name not in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(trained[name], tensor), name
    wte, base_wte = trained["transformer.wte.weight"], base.gpt2.state_dict()["transformer.wte.weight"]
    assert torch.equal(wte[:GPT2_VOCAB_SIZE + 1], base_wte[:GPT2_VOCAB_SIZE + 1])
    for name, task in TASKS.items():
        rows = task.token_ids()
        assert torch.equal(wte[rows], base_wte[rows]) == (name not in ("mt", "nlg")), name
    # the skills and both routers moved (B starts at zero, routers within 1e-3)
    inventory = result.model.poly_inventory
    assert all(b.abs().max() > 1e-4 for b in inventory.B.values())
    assert all(result.model.tasks[t].methods["lora"].router.abs().max() > 2e-3 for t in ("mt", "nlg"))
    # learning: the mean validation NLL fell from before training by a clear margin
    records = result.metrics
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["val_nll_mean"] < records[0]["val_nll_mean"] - 0.2
    # the run folder: ordinary lora tasks, own tensors only, plus the inventory
    config = json.loads((out / "vlm_config.json").read_text())
    assert {t: e["methods"] for t, e in config["tasks"].items()} == args.methods
    tensors = load_file(str(out / "adapters.safetensors"))
    assert {k.split(".lora.")[0] if ".lora." in k else k for k in tensors} == {
        "methods.mt", "methods.nlg", "task_embeddings.mt", "task_embeddings.nlg"}
    inventory_config = json.loads((out / "poly_inventory.json").read_text())
    assert inventory_config["tasks"] == ["mt", "nlg"]
    assert inventory_config["options"] == {"skills": 4, "r": 8, "splits": 2, "targets": ["q", "v"]}
    fingerprint = backbone_fingerprint(base.gpt2)
    assert inventory_config["base_fingerprint"] == config["base_fingerprint"] == fingerprint
    for name in ("checkpoint_epoch2", "checkpoint_epoch3"):  # epoch checkpoints: lora config too
        epoch_config = json.loads((out / name / "vlm_config.json").read_text())
        assert {t: e["methods"] for t, e in epoch_config["tasks"].items()} == args.methods
        assert (out / name / "poly_inventory.safetensors").is_file()
    # loaded as plain lora tasks, each task's logits equal the trained model's (eval) exactly,
    # and the last validation is the exact per-task NLL of what was saved
    loaded, _, _ = load_checkpoint(str(out))
    assert all(type(t.methods["lora"]) is LoRAMethod for t in loaded.tasks.values())
    result.model.eval()
    with torch.no_grad():
        tids = torch.tensor([2, 4, -1])
        assert torch.equal(loaded(IDS, task_ids=tids).logits, result.model(IDS, task_ids=tids).logits)
    for task in ("mt", "nlg"):
        assert records[-1]["val"][task]["nll"] == pytest.approx(exact_nll(loaded, task, data[task]), rel=1e-5)
    training_args = json.loads((out / "training_args.json").read_text())
    assert training_args["poly"] == args.poly and training_args["method"] == ["poly"]


def test_a_new_task_routes_over_the_frozen_inventory_or_starts_from_its_average(poly_run, tiny_base):
    """train.py --poly_inventory: route (MHR-z) trains only the task's router (the skills stay the
    inventory's bit for bit) and saves a lora task; average (MHR-mu) starts the task's LoRA at the
    mean skill, exactly, and trains it as a LoRA."""
    folder, data, _, _, _ = poly_run
    source = load_file(str(folder / "out" / "poly_inventory.safetensors"))
    inventory = str(folder / "out")
    shape = BackboneShape(n_layer=2, d_model=64, n_head=4, d_inner=256)
    rows = len(TASKS["summarization"].special_tokens) * 64

    args = train.parse_args(poly_train_argv(folder, data, tiny_base, "--n_epochs", "1", "--method", "poly",
                                            "--poly_inventory", inventory, out="route"))
    result = training.run_training(args)
    assert args.poly["inventory_mode"] == "route" and args.poly["splits"] == 2
    assert args.methods == {"lora": LORA_DEFAULT}
    saved = load_file(str(folder / "route" / "poly_inventory.safetensors"))
    for key, value in source.items():
        if key.startswith("skills."):
            assert torch.equal(saved[key], value), key
    router = saved["router.summarization"]
    assert router.shape == (4, 2, 4) and router.abs().max() > 2e-3
    assert result.model.count_trainable("adapter", "summarization") == router.numel() + rows
    loaded, _, config = load_checkpoint(str(folder / "route"))
    assert config["tasks"]["summarization"]["methods"] == {"lora": LORA_DEFAULT}
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS, task_ids=3).logits, result.model(IDS, task_ids=3).logits)

    args = train.parse_args(poly_train_argv(folder, data, tiny_base, "--n_epochs", "0", "--method", "poly",
                                            "--poly_inventory", inventory, "--poly_inventory_mode", "average",
                                            out="average"))
    result = training.run_training(args)
    assert result.model.count_trainable("adapter", "summarization") == \
        LoRAMethod.parameter_count(shape, LORA_DEFAULT) + rows
    assert not (folder / "average" / "poly_inventory.json").exists()  # a plain LoRA run
    tensors = load_file(str(folder / "average" / "adapters.safetensors"))
    for key, _, _ in pair_shapes(shape, ["q", "v"]):
        A, B = mix(source[f"skills.{key}.A"], source[f"skills.{key}.B"], torch.full((2, 4), 0.25))
        assert torch.equal(tensors[f"methods.summarization.lora.pairs.{key}.A"], A)
        assert torch.equal(tensors[f"methods.summarization.lora.pairs.{key}.B"], B)
        torch.testing.assert_close(A, source[f"skills.{key}.A"].mean(1).reshape(-1, 8).t())


def test_exported_tasks_combine_add_replace_and_remove(poly_run, tiny_base, tmp_path):
    """combine_all.py takes the poly run folder as any multi-task checkpoint: add a new task
    (routed over the inventory), replace it (its MHR-mu version), remove one; every kept task's
    logits stay bit-identical to its source."""
    folder, data, _, _, _ = poly_run
    inventory = str(folder / "out")
    for mode, out in (("route", "new_route"), ("average", "new_average")):
        training.run_training(train.parse_args(poly_train_argv(
            tmp_path, data, tiny_base, "--n_epochs", "1", "--method", "poly", "--poly_inventory", inventory,
            "--poly_inventory_mode", mode, out=out)))
    vlm, smaller = tmp_path / "vlm", tmp_path / "smaller"
    combine_all.main([inventory, str(tmp_path / "new_route"), "--output_dir", str(vlm)])
    combine_all.main(["--vlm", str(vlm), "--replace", str(tmp_path / "new_average"),
                      "--output_dir", str(vlm)])
    combine_all.main(["--vlm", str(vlm), "--remove", "nlg", "--output_dir", str(smaller)])
    full, _, _ = load_checkpoint(str(vlm))
    cut, _, config = load_checkpoint(str(smaller))
    assert list(config["tasks"]) == ["mt", "summarization"]
    sources = {"mt": load_checkpoint(inventory)[0], "nlg": load_checkpoint(inventory)[0],
               "summarization": load_checkpoint(str(tmp_path / "new_average"))[0]}
    for task, source in sources.items():  # the columns the task can generate, on inputs using its rows
        spec = source.tasks[task].spec()
        inputs = sample_inputs(spec)
        expected = task_logits(source, spec, *inputs)
        assert torch.equal(task_logits(full, spec, *inputs), expected), task
        if task != "nlg":
            assert torch.equal(task_logits(cut, spec, *inputs), expected), task


def test_sigkill_then_resume_gives_the_uninterrupted_runs_weights(tmp_path, tiny_base):
    """train_vlm.py --method poly with the defaults (relaxed-Bernoulli draws in every training
    forward, so the random state matters): killed after its first epoch checkpoint and resumed,
    it ends with the uninterrupted run's tensors, inventory and routers bit for bit."""
    data = poly_data(tmp_path, copies=4)

    def argv(out):
        return poly_vlm_argv(tmp_path, data, tiny_base, "--n_epochs", "3", "--lr", "1e-2", "--method", "poly",
                             out=out)
    reference = popen_script("train_vlm.py", argv("full"), tmp_path / "full.log")
    victim = popen_script("train_vlm.py", argv("killed"), tmp_path / "killed.log")
    killed = tmp_path / "killed"
    sigkill_after_first_checkpoint(victim, killed, tmp_path / "killed.log", timeout=200)
    assert reference.wait(300) == 0, (tmp_path / "full.log").read_text()[-3000:]
    assert not (killed / "vlm_config.json").exists()
    resumed = popen_script("train_vlm.py", argv("killed") + ["--resume"], tmp_path / "resumed.log")
    assert resumed.wait(300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert "resuming from" in (tmp_path / "resumed.log").read_text()
    full = tmp_path / "full"
    for name in ("adapters.safetensors", "poly_inventory.safetensors",
                 "checkpoint_epoch3/training_state.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(killed / name))
        assert sorted(a) == sorted(b)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    state = json.loads((killed / "checkpoint_epoch3" / "training_state.json").read_text())
    assert state["settings"]["poly"]["tasks"] == ["mt", "nlg"]
    assert [g.get("lr_scale") for g in state["optimizer"]["param_groups"]] == [None, pytest.approx(10.0)]


def test_torchrun_two_processes_share_one_inventory(tmp_path, tiny_base):
    """Under DistributedDataParallel the skills' gradients of both processes meet (the backbone
    stays frozen, the saved tasks load), and each task's all-reduced validation NLL is the exact
    NLL of the saved model on the whole split."""
    data = poly_data(tmp_path)
    env = dict(os.environ, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    argv = poly_vlm_argv(tmp_path, data, tiny_base, "--n_epochs", "1", "--lr", "1e-2", "--method", "poly")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "train_vlm.py", *argv]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trainable parameters:") == 1  # rank 0 only
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    model, _, _ = load_checkpoint(str(out))
    for task in ("mt", "nlg"):
        assert records[-1]["val"][task]["nll"] == pytest.approx(exact_nll(model, task, data[task]), rel=1e-5)
    assert load_file(str(out / "poly_inventory.safetensors"))["skills.0_q.B"].abs().max() > 0


# --- user errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, expected", [
    (["--method", "poly", "--poly_splits", "3"], "--poly_splits 3: does not divide the 64 -> 64 projection"),
    (["--method", "poly", "--poly_r", "0"], "--method poly: r must be at least 1, got 0"),
    (["--method", "poly", "--poly_targets", "q,w"], "--method poly: unknown target 'w'"),
    (["--method", "poly", "--poly_router_lr", "0"], "--method poly: router_lr must be positive"),
    (["--method", "lora", "--poly_skills", "2"],
     "--poly_skills is an option of poly, which no task's --method uses"),
    (["--method", "nlg=poly+lora"], "--method nlg=poly+lora: poly is a LoRA per task already"),
    (["--method", "poly", "--lora_r", "2"],
     "--lora_r is an option of lora, which no task of --method poly uses"),
    (["--method", "poly", "--no_adapter"], "--no_adapter fine-tunes all of GPT-2"),
    (["--method", "poly", "--poly_inventory_mode", "route"],
     "--poly_inventory_mode route: give --poly_inventory"),
    (["--method", "poly", "--poly_inventory", "missing"], "--poly_inventory missing: no such folder"),
])
def test_bad_poly_flags_give_one_error_line(tmp_path, tiny_base, capsys, extra, expected):
    data = poly_data(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train_vlm.main(poly_vlm_argv(tmp_path, data, tiny_base, "--n_epochs", "1", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not os.path.exists(tmp_path / "out")


def test_inventory_refusals_name_the_flag(poly_run, tiny_base, tmp_path, capsys):
    """A structure flag that differs from the inventory's, and an inventory of another backbone."""
    folder, data, _, _, _ = poly_run
    inventory = str(folder / "out")
    other = tmp_path / "other_base"
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=512))
    gpt2.save_pretrained(other)
    for extra, base, expected in [
            (["--poly_r", "4"], tiny_base, f"--poly_r 4: the inventory {inventory} has r 8"),
            ([], str(other), f"--poly_inventory {inventory}: the inventory was trained on another backbone")]:
        with pytest.raises(SystemExit):
            train.main(poly_train_argv(tmp_path, data, base, "--n_epochs", "1", "--method", "poly",
                                       "--poly_inventory", inventory, *extra, out="x"))
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines
        assert not os.path.exists(tmp_path / "x")


def test_the_default_run_folder_names_poly(tmp_path, tiny_base):
    from engines.poly import prepare_with_poly
    from engines.settings import prepare_multitask_args
    data = poly_data(tmp_path)
    argv = poly_vlm_argv(tmp_path, data, tiny_base, "--method", "poly")
    del argv[argv.index("--output_dir"):argv.index("--output_dir") + 2]
    args = train_vlm.parse_args(argv)
    os.chdir(tmp_path)  # the default folder is relative: runs/...
    try:
        prepare_with_poly(args, prepare_multitask_args)
    finally:
        os.chdir(REPO)
    assert "_VLM_multitask_poly_" in args.output_dir
