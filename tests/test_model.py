"""VersatileLM: plain-GPT-2 equality, per-row task routing, what trains, checkpoints."""
import os

import pytest
import torch
from conftest import tiny_gpt2

from engines.specs import adapter_specs
from models.adapters import Adapter
from models.checkpoint import load_checkpoint, save_checkpoint
from models.vlm import VOCAB_SIZE, VersatileLM, add_special_token_rows, backbone_fingerprint
from tasks.table import TASKS
from utils.errors import VLMError
from utils.vocab import ALL_SPECIAL_TOKENS, special_token_id


def make_model(adapters=None, seed=0):
    gpt2 = tiny_gpt2(seed)
    add_special_token_rows(gpt2)
    return VersatileLM(gpt2, adapter_specs(adapters or {})).eval()


def test_special_tokens_have_the_reference_ids(tokenizer):
    assert len(ALL_SPECIAL_TOKENS) == 30 and VOCAB_SIZE == 50287
    expected = {"<pad>": 50257, "<bos_dial>": 50258, "<persona>": 50262, "<bos_qa>": 50263,
                "<document>": 50267, "<bos_mt>": 50268, "<target_mt>": 50271, "<bos_sm>": 50272,
                "<target_sm>": 50275, "<bos_nlg>": 50276, "<customerRating>": 50285, "<response>": 50286}
    for token, token_id in expected.items():
        assert special_token_id(token) == token_id
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    assert len(tokenizer) == 50287


def test_all_ids_minus_one_equals_plain_gpt2_exactly():
    model = make_model({"mt": 16, "nlg": 4})
    plain = tiny_gpt2()
    add_special_token_rows(plain)
    ids = torch.randint(0, VOCAB_SIZE, (3, 11))
    types = torch.randint(0, VOCAB_SIZE, (3, 11))
    with torch.no_grad():
        expected = plain(ids, token_type_ids=types).logits
        assert torch.equal(model(ids, token_type_ids=types, task_ids=torch.tensor([-1, -1, -1])).logits,
                           expected)
        assert torch.equal(model(ids, token_type_ids=types).logits, expected)
        # and the adapters really change the output when selected
        assert not torch.allclose(model(ids, token_type_ids=types, task_ids=TASKS["mt"].task_id).logits,
                                  expected)


def test_mixed_batch_rows_equal_single_task_rows():
    model = make_model({"mt": 16, "nlg": 4, "qa": 8})
    ids = torch.randint(0, VOCAB_SIZE, (4, 9))
    task_ids = torch.tensor([TASKS["mt"].task_id, TASKS["nlg"].task_id, -1, TASKS["qa"].task_id])
    with torch.no_grad():
        mixed = model(ids, token_type_ids=ids, task_ids=task_ids).logits
        for row, task_id in enumerate(task_ids.tolist()):
            single = model(ids[row:row + 1], token_type_ids=ids[row:row + 1], task_ids=task_id).logits[0]
            torch.testing.assert_close(mixed[row], single, rtol=0, atol=1e-5)
            assert torch.equal(mixed[row].argmax(-1), single.argmax(-1))


def test_unknown_task_id_is_refused():
    model = make_model({"mt": 4})
    with pytest.raises(VLMError, match="has no module"):
        model(torch.zeros(1, 3, dtype=torch.long), task_ids=TASKS["nlg"].task_id)


def test_adapter_shapes_and_parameter_count():
    # LayerNorm (2d) + down (d*b + b) + up (b*d + d), as the authors' Adapter.
    d, b = 768, 300
    assert sum(p.numel() for p in Adapter(d, b).parameters()) == 2 * d + d * b + b + b * d + d == 463_404
    adapter = Adapter(8, 3)
    h = torch.randn(2, 5, 8)
    expected = h + adapter.project_up(torch.relu(adapter.project_down(adapter.ln(h))))
    assert torch.equal(adapter(h), expected)


def train_steps(model, mode, task, steps=3):
    params = model.mark_trainable(mode, task)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    task_id = TASKS[task].task_id if task in model.tasks else None
    for _ in range(steps):
        ids = torch.randint(0, VOCAB_SIZE, (2, 12))
        model(ids, token_type_ids=ids, task_ids=task_id, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_adapter_training_keeps_backbone_and_other_rows_bit_identical():
    model = make_model({"mt": 8, "nlg": 4})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, "adapter", "mt")
    after = model.state_dict()
    own = TASKS["mt"].token_ids()
    for name, tensor in before.items():
        if name.startswith("tasks.mt."):
            assert not torch.equal(tensor, after[name]), name
        elif name in ("gpt2.transformer.wte.weight", "gpt2.lm_head.weight"):
            others = [i for i in range(VOCAB_SIZE) if i not in own]
            assert torch.equal(tensor[others], after[name][others])
            assert not torch.equal(tensor[own], after[name][own])
        else:
            assert torch.equal(tensor, after[name]), name  # backbone and other tasks' adapters
    assert model.count_trainable("adapter", "mt") == sum(
        p.numel() for p in model.tasks["mt"].methods.parameters()) + 4 * 64


def test_emb_only_trains_only_the_task_rows():
    model = make_model({"nlg": 0})
    before = model.gpt2.transformer.wte.weight.clone()
    train_steps(model, "emb_only", "nlg")
    after = model.gpt2.transformer.wte.weight
    own = TASKS["nlg"].token_ids()
    changed = (before != after).any(-1).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(own)


def test_task_rows_train_as_views_with_the_tied_tables_gradient():
    """Adapter/emb_only training: the tied table stays frozen and only small views of the tasks'
    rows are parameters; forward values are bit-identical to the plain model, and the rows'
    gradient equals what the trainable tied table would receive at those rows."""
    model = make_model({"mt": 8, "nlg": 4})
    reference = make_model({"mt": 8, "nlg": 4})
    params = model.mark_trainable("adapter", ["mt", "nlg"])
    wte = model.gpt2.transformer.wte.weight
    assert not wte.requires_grad and all(p.numel() < wte.numel() for p in params)
    reference.gpt2.transformer.wte.weight.requires_grad_(True)
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB_SIZE, (4, 9), generator=generator)
    ids[:, 0] = TASKS["mt"].token_ids()[0]
    ids[:, 3] = TASKS["nlg"].token_ids()[2]
    types = torch.where(torch.arange(9) < 5, TASKS["mt"].token_ids()[2], TASKS["nlg"].token_ids()[1])
    types = types.expand(4, 9)
    task_ids = torch.tensor([TASKS["mt"].task_id, TASKS["nlg"].task_id, TASKS["mt"].task_id, -1])
    logits = model(ids, token_type_ids=types, task_ids=task_ids).logits  # grad mode: the hooks run
    assert logits.requires_grad
    assert torch.equal(logits, reference(ids, token_type_ids=types, task_ids=task_ids).logits)
    model(ids, token_type_ids=types, task_ids=task_ids, labels=ids).loss.backward()
    reference(ids, token_type_ids=types, task_ids=task_ids, labels=ids).loss.backward()
    table_grad = reference.gpt2.transformer.wte.weight.grad
    for task in ("mt", "nlg"):
        rows = model.task_rows.rows[task]
        assert rows.data_ptr() == wte[TASKS[task].token_ids()[0]].data_ptr()  # a view of the table
        torch.testing.assert_close(rows.grad, table_grad[TASKS[task].token_ids()], rtol=1e-5, atol=1e-7)
        assert rows.grad.abs().sum() > 0
    with torch.no_grad():  # an optimizer's in-place update lands in the table
        model.task_rows.rows["nlg"].add_(1.0)
    assert torch.equal(wte[TASKS["nlg"].token_ids()], reference.gpt2.transformer.wte.weight[
        TASKS["nlg"].token_ids()].detach() + 1.0)
    assert not any(k.startswith("task_rows") for k in model.state_dict())
    model.mark_trainable("full")
    assert model.task_rows is None and wte.requires_grad


def test_loss_from_labelled_positions_equals_the_full_logits_loss():
    """Training and validation run the output layer only where a label is predicted."""
    model = make_model({"mt": 8})
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB_SIZE, (3, 10), generator=generator)
    labels = ids.clone()
    labels[:, :6] = -100       # prompt positions
    labels[2, 8:] = -100       # right padding
    task_ids = torch.tensor([TASKS["mt"].task_id, -1, TASKS["mt"].task_id])
    with torch.no_grad():
        full = model(ids, token_type_ids=ids, task_ids=task_ids).logits
        expected = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, VOCAB_SIZE),
                                                     labels[:, 1:].reshape(-1))
        loss = model(ids, token_type_ids=ids, task_ids=task_ids, labels=labels).loss
        logits, targets = model.labelled_logits(ids, labels, ids, task_ids)
    assert logits.shape == (4 + 4 + 2, VOCAB_SIZE) and (targets.tolist()
                                                        == labels[:, 1:][labels[:, 1:] != -100].tolist())
    torch.testing.assert_close(logits, full[:, :-1][labels[:, 1:] != -100], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_lean_gelu_has_gelu_new_values_and_gradient_with_less_saved_memory():
    from transformers.activations import NewGELUActivation

    from models.memory import LeanGELU
    original, lean = NewGELUActivation(), LeanGELU(NewGELUActivation())
    x = (torch.randn(4, 9, 32, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    saved = {"lean": 0, "original": 0}
    for name, module, inp in (("lean", lean, x), ("original", original, x_ref)):
        def pack(t, name=name):
            saved[name] += t.numel() if t.dim() else 0
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(inp)
        out.backward(torch.ones_like(out) * torch.linspace(-1, 1, 32))
        if name == "lean":
            lean_out = out
        else:
            ref_out = out
    assert torch.equal(lean_out, ref_out)                                  # forward: bit-identical
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)   # backward: same derivative
    assert saved["lean"] == x.numel() and saved["original"] >= 3 * x.numel()
    model = make_model()
    assert all(isinstance(block.mlp.act, LeanGELU) for block in model.gpt2.transformer.h)


def test_training_memory_savers_keep_values_and_gradients(monkeypatch):
    """Recomputed attention (train mode) and the chunked loss: the same loss and gradients as the
    plain computation, less saved for backward; eval mode goes back to plain SDPA."""
    import models.vlm as vlm
    ids = torch.randint(0, VOCAB_SIZE, (3, 12), generator=torch.Generator().manual_seed(7))
    labels = ids.clone()
    labels[:, :4] = -100
    results = {}
    for name, chunk, attention in (("lean", 5, True), ("plain", 10 ** 9, False)):
        monkeypatch.setattr(vlm, "LOSS_CHUNK", chunk)
        model = make_model({"nlg": 8})
        model.mark_trainable("adapter", "nlg")
        model.train()
        if not attention:
            model.gpt2.set_attn_implementation("sdpa")
        saved = []
        torch.manual_seed(0)  # the same dropout masks
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(ids, token_type_ids=ids, task_ids=TASKS["nlg"].task_id, labels=labels).loss
        loss.backward()
        results[name] = (loss.detach(), [p.grad.clone() for p in model.tasks["nlg"].methods.parameters()],
                         sum(saved), model.gpt2.config._attn_implementation)
        model.eval()
        assert model.gpt2.config._attn_implementation == "sdpa"
    (lean_loss, lean_grads, lean_saved, lean_attention), (loss, grads, saved, attention) = (results["lean"],
                                                                                            results["plain"])
    assert lean_attention != attention == "sdpa"
    torch.testing.assert_close(lean_loss, loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(lean_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert lean_saved < saved


def test_new_rows_are_the_same_for_every_run():
    a, b = make_model(seed=0), make_model(seed=0)
    torch.manual_seed(123)  # the run's seed must not matter
    c = tiny_gpt2(0)
    add_special_token_rows(c)
    assert torch.equal(a.gpt2.transformer.wte.weight, b.gpt2.transformer.wte.weight)
    assert torch.equal(a.gpt2.transformer.wte.weight, c.transformer.wte.weight)


def test_adapter_checkpoint_reloads_to_identical_logits(tmp_path, tiny_base, tokenizer):
    model = VersatileLM.from_pretrained(tiny_base, adapter_specs({"nlg": 4}))
    train_steps(model, "adapter", "nlg")
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", "adapter", ["nlg"], tiny_base)
    weights = tmp_path / "ckpt" / "adapters.safetensors"
    assert weights.stat().st_size < 100_000  # adapters and rows only, not the backbone
    loaded, _, config = load_checkpoint(str(tmp_path / "ckpt"))
    assert config["tasks"] == {"nlg": {"bottleneck": 4, "task_id": TASKS["nlg"].task_id,
                                       "token_ids": list(TASKS["nlg"].token_ids()),
                                       "methods": {"adapter": {"bottleneck": 4}}}}
    assert config["base_fingerprint"] == backbone_fingerprint(model.gpt2)
    ids = torch.randint(0, VOCAB_SIZE, (2, 10))
    with torch.no_grad():
        expected = model(ids, token_type_ids=ids, task_ids=TASKS["nlg"].task_id).logits
        assert torch.equal(loaded(ids, token_type_ids=ids, task_ids=TASKS["nlg"].task_id).logits, expected)


def test_full_checkpoint_reloads_to_identical_logits(tmp_path, tiny_base, tokenizer):
    model = VersatileLM.from_pretrained(tiny_base)
    train_steps(model, "full", "mt")
    save_checkpoint(model, tokenizer, tmp_path / "full", "full", ["mt"], tiny_base)
    loaded, _, config = load_checkpoint(str(tmp_path / "full"))
    assert config["mode"] == "full"
    ids = torch.randint(0, VOCAB_SIZE, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids, token_type_ids=ids).logits, model(ids, token_type_ids=ids).logits)


def test_checkpoint_refuses_another_backbone_and_corrupt_files(tmp_path, tiny_base, tokenizer):
    model = VersatileLM.from_pretrained(tiny_base, adapter_specs({"mt": 4}))
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", "adapter", ["mt"], tiny_base)
    other = tmp_path / "other_base"
    tiny_gpt2(seed=1).save_pretrained(other)
    with pytest.raises(VLMError, match="another backbone"):
        load_checkpoint(str(tmp_path / "ckpt"), base_model=str(other))
    weights = tmp_path / "ckpt" / "adapters.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(VLMError, match="adapters.safetensors: corrupted or truncated"):
        load_checkpoint(str(tmp_path / "ckpt"))
    os.remove(weights)
    with pytest.raises(VLMError, match="not found"):
        load_checkpoint(str(tmp_path / "ckpt"))


def test_a_backbone_with_another_vocabulary_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64,
                               vocab_size=1000)).save_pretrained(tmp_path)
    with pytest.raises(VLMError, match="vocabulary of 1000 tokens"):
        VersatileLM.from_pretrained(str(tmp_path))


def test_atomic_writes_keep_the_old_file_when_writing_fails(tmp_path):
    from utils.io import atomic_path, write_json
    target = tmp_path / "metrics.json"
    write_json(target, {"good": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write('{"half": ')
            raise RuntimeError("crash mid-write")
    assert target.read_text() == '{\n  "good": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left behind
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # usual permissions, not mkstemp's


def test_atomic_folders_replace_whole_folders_and_leave_nothing_on_failure(tmp_path):
    from utils.io import atomic_folder
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:                     # a missing folder
        with open(os.path.join(tmp, "a.txt"), "w") as f:
            f.write("first")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)  # a folder's usual mode, not mkdtemp's
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            with open(os.path.join(tmp, "b.txt"), "w") as f:
                f.write("half")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"] and (target / "a.txt").read_text() == "first"
    with atomic_folder(target) as tmp:                     # a full folder is replaced whole
        with open(os.path.join(tmp, "b.txt"), "w") as f:
            f.write("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
