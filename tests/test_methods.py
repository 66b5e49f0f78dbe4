"""The core methods (adapter, lora, prefix, prompt, ptuning): parameter counts by formula on GPT-2
small's shape, agreement with HF PEFT's implementations on the same tiny GPT-2 with our tensors,
exported forms equal to trained ones, batched LoRA routing equal to per-task sub-batches, rows of
all methods in one batch equal to each row alone, and gradients only for each row's own task."""
import copy
import math
import warnings

import pytest
import torch
from conftest import tiny_gpt2

from models.methods import METHODS, BackboneShape, method_class, parse_method_spec
from models.methods import lora as lora_module
from models.vlm import TaskSpec, VersatileLM, add_special_token_rows
from utils.errors import VLMError
from utils.vocab import PAD_ID, builtin_token_ids

SMALL = BackboneShape(n_layer=12, d_model=768, n_head=12, d_inner=3072)


def base_gpt2(seed=0):
    gpt2 = tiny_gpt2(seed)
    add_special_token_rows(gpt2)
    return gpt2


def randomize(model, std=0.05, seed=1):
    """Give zero-initialized parts (LoRA's B, ...) values, so comparisons can fail."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for task in model.tasks.values():
            for p in task.methods.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * std)
    return model


def counted(name, options, shape=SMALL):
    with torch.device("meta"):
        module = method_class(name)(shape, options)
    return sum(p.numel() for p in module.parameters())


# --- parameter counts --------------------------------------------------------------------------
@pytest.mark.parametrize("name, options, formula", [
    # 5.55M, as the paper
    ("adapter", {"bottleneck": 300}, 12 * (2 * 768 + 768 * 300 + 300 + 300 * 768 + 768)),
    ("adapter", {"bottleneck": 10}, 12 * (2 * 768 + 768 * 10 + 10 + 10 * 768 + 768)),
    ("lora", {}, 12 * 2 * 4 * (768 + 768)),                                                # q, v at rank 4
    ("lora", {"r": 8, "targets": ["q", "k", "v", "attn_proj", "mlp_fc", "mlp_proj"]},
     12 * 8 * (4 * (768 + 768) + (768 + 3072) + (3072 + 768))),
    # trained through the MLP
    ("prefix", {}, 10 * 768 + (768 * 512 + 512) + (512 * 2 * 12 * 768 + 2 * 12 * 768)),
    # what a checkpoint stores
    ("prefix", {"reparameterize": False}, 10 * 2 * 12 * 768),
    ("prompt", {}, 100 * 768),
    ("ptuning", {}, 10 * 768 + 2 * (4 * 768 * 768 + 4 * 768 * 768 + 8 * 768)
     + 2 * (4 * 768 * 1536 + 4 * 768 * 768 + 8 * 768) + (1536 * 1536 + 1536) + (1536 * 768 + 768)),
    ("ptuning", {"encoder": "mlp"}, 10 * 768 + 3 * (768 * 768 + 768)),
    ("ptuning", {"reparameterize": False}, 10 * 768),                                    # a prompt-table row
])
def test_parameter_counts_equal_the_formulas_on_gpt2_small(name, options, formula):
    resolved = method_class(name).resolve(options)
    assert counted(name, options) == method_class(name).parameter_count(SMALL, resolved) == formula


def test_the_adapter_is_the_authors_size():
    # REFERENCE.md: b = 300 on GPT-2 small is 462,636 parameters a block without the adapter's LayerNorm
    # gain (768 more here), 5.55M in all, 4.5% of GPT-2 small.
    assert counted("adapter", {"bottleneck": 300}) == 12 * (462_636 + 768)
    assert abs(counted("adapter", {"bottleneck": 300}) / 124_439_808 - 0.045) < 0.001


def test_method_specs_and_bad_options_are_clear_errors():
    assert parse_method_spec("prefix+lora") == ["prefix", "lora"]
    assert list(METHODS)[:5] == ["adapter", "lora", "prefix", "prompt", "ptuning"] or "houlsby" in METHODS
    with pytest.raises(VLMError, match="unknown method 'lorra'"):
        parse_method_spec("lorra")
    with pytest.raises(VLMError, match="a method is named twice"):
        parse_method_spec("lora+lora")
    with pytest.raises(VLMError, match="--method lora: r must be at least 1, got 0"):
        method_class("lora").resolve({"r": 0})
    with pytest.raises(VLMError, match="unknown target 'w_q'"):
        method_class("lora").resolve({"targets": ["w_q"]})
    with pytest.raises(VLMError, match="unknown option 'rank'"):
        method_class("lora").resolve({"rank": 4})
    with pytest.raises(VLMError, match="option 'length' must be like 10"):
        method_class("prefix").resolve({"length": "ten"})
    with pytest.raises(VLMError, match="both add virtual tokens"):
        VersatileLM(base_gpt2(), [TaskSpec("mt", 2, builtin_token_ids("mt"), {"prompt": {}, "ptuning": {}})])


# --- agreement with PEFT -------------------------------------------------------------------------
def peft_model(gpt2, config):
    import peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(gpt2, config).eval()


def peft_logits(model, *args, **kwargs):
    with warnings.catch_warnings(), torch.no_grad():  # PEFT's own calls use deprecated transformers arguments
        warnings.simplefilter("ignore")
        return model(*args, **kwargs).logits


def one_task_model(methods, seed=0):
    gpt2 = base_gpt2(seed)
    reference = copy.deepcopy(gpt2)
    model = VersatileLM(gpt2, [TaskSpec("nlg", 4, builtin_token_ids("nlg"), methods)]).eval()
    return randomize(model), reference


IDS = torch.randint(0, 50257, (3, 10), generator=torch.Generator().manual_seed(5))


def test_lora_on_q_and_v_agrees_with_peft_lora_on_the_fused_c_attn():
    from peft import LoraConfig
    model, reference = one_task_model({"lora": {"r": 4, "alpha": 32.0, "dropout": 0.0}})
    lora = model.tasks["nlg"].methods["lora"]
    # q and v of rank 4 each are one LoRA of rank 8 on c_attn: A stacked, B block-diagonal into q's and
    # v's columns.
    reference = peft_model(reference, LoraConfig(r=8, lora_alpha=64, target_modules=["c_attn"],
                                                 fan_in_fan_out=True, lora_dropout=0.0))
    d = 64
    with torch.no_grad():
        for layer in range(2):
            q, v = lora.pairs[f"{layer}_q"], lora.pairs[f"{layer}_v"]
            attn = reference.base_model.model.transformer.h[layer].attn.c_attn
            attn.lora_A["default"].weight.copy_(torch.cat([q.A, v.A]))
            b = torch.zeros(3 * d, 8)
            b[:d, :4], b[2 * d:, 4:] = q.B, v.B
            attn.lora_B["default"].weight.copy_(b)
    with torch.no_grad():
        ours = model(IDS, task_ids=4).logits
    torch.testing.assert_close(ours, peft_logits(reference, IDS), rtol=0, atol=1e-5)
    assert (ours - model(IDS, task_ids=-1).logits).abs().max() > 1e-2  # the update is not nothing


def test_lora_on_the_output_and_mlp_projections_agrees_with_peft():
    from peft import LoraConfig
    targets = ["attn_proj", "mlp_fc", "mlp_proj"]
    model, reference = one_task_model({"lora": {"r": 3, "alpha": 6.0, "dropout": 0.0, "targets": targets}})
    lora = model.tasks["nlg"].methods["lora"]
    reference = peft_model(reference, LoraConfig(r=3, lora_alpha=6, fan_in_fan_out=True, lora_dropout=0.0,
                                                 target_modules=r".*\.(attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"))
    names = {"attn_proj": "attn.c_proj", "mlp_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"}
    with torch.no_grad():
        for layer in range(2):
            block = reference.base_model.model.transformer.h[layer]
            for target, path in names.items():
                owner, attr = path.split(".")
                module = getattr(getattr(block, owner), attr)
                module.lora_A["default"].weight.copy_(lora.pairs[f"{layer}_{target}"].A)
                module.lora_B["default"].weight.copy_(lora.pairs[f"{layer}_{target}"].B)
        ours = model(IDS, task_ids=4).logits
    torch.testing.assert_close(ours, peft_logits(reference, IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("reparameterize", [True, False])
def test_prefix_agrees_with_peft_prefix_tuning(reparameterize):
    from peft import PrefixTuningConfig
    model, reference = one_task_model({"prefix": {"length": 4, "hidden": 16,
                                                  "reparameterize": reparameterize}})
    prefix = model.tasks["nlg"].methods["prefix"]
    reference = peft_model(reference, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                         prefix_projection=reparameterize,
                                                         encoder_hidden_size=16))
    encoder = reference.prompt_encoder["default"]
    with torch.no_grad():
        if reparameterize:
            encoder.embedding.load_state_dict(prefix.embedding.state_dict())
            encoder.transform.load_state_dict(prefix.transform.state_dict())
        else:
            encoder.embedding.weight.copy_(prefix.prefixes)
        ours = model(IDS, task_ids=4).logits
    mask = torch.ones_like(IDS)
    # PEFT's real tokens start at position P too (it lets GPT-2 count the cached prefix).
    torch.testing.assert_close(ours, peft_logits(reference, input_ids=IDS, attention_mask=mask), rtol=0,
                               atol=1e-5)


def virtual_inputs(ids, n):
    batch = ids.shape[0]
    input_ids = torch.cat([torch.full((batch, n), PAD_ID), ids], dim=1)
    virtual = torch.cat([torch.arange(n).expand(batch, n), torch.full(ids.shape, -1)], dim=1)
    return input_ids, virtual


def test_prompt_tuning_agrees_with_peft():
    from peft import PromptTuningConfig
    model, reference = one_task_model({"prompt": {"length": 6}})
    reference = peft_model(reference, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(model.tasks["nlg"].methods["prompt"].embeddings)
        input_ids, virtual = virtual_inputs(IDS, 6)
        ours = model(input_ids, task_ids=4, virtual_ids=virtual).logits
    torch.testing.assert_close(ours, peft_logits(reference, input_ids=IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_ptuning_agrees_with_peft_and_its_exported_row_is_the_encoder_output(encoder):
    from peft import PromptEncoderConfig
    model, reference = one_task_model({"ptuning": {"length": 5, "encoder": encoder, "hidden": 12}})
    ptuning = model.tasks["nlg"].methods["ptuning"]
    reference = peft_model(reference, PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_reparameterization_type=encoder.upper(),
        encoder_hidden_size=12, encoder_num_layers=2))
    with torch.no_grad():
        missing, unexpected = reference.prompt_encoder["default"].load_state_dict(
            ptuning.encoder.state_dict(), strict=False)
        assert not unexpected and not missing
        input_ids, virtual = virtual_inputs(IDS, 5)
        ours = model(input_ids, task_ids=4, virtual_ids=virtual).logits
        torch.testing.assert_close(ours, peft_logits(reference, input_ids=IDS), rtol=0, atol=1e-5)
        row = ptuning.exported()
        assert row.options["reparameterize"] is False and sum(p.numel() for p in row.parameters()) == 5 * 64
        assert torch.equal(row.table, ptuning.encoder())
        model.export_methods()
        assert torch.equal(model(input_ids, task_ids=4, virtual_ids=virtual).logits, ours)


def test_an_exported_prefix_gives_the_trained_logits_exactly():
    model, _ = one_task_model({"prefix": {"length": 3, "hidden": 8}})
    with torch.no_grad():
        before = model(IDS, task_ids=4).logits
        model.export_methods()
        assert model.tasks["nlg"].methods["prefix"].options["reparameterize"] is False
        assert torch.equal(model(IDS, task_ids=4).logits, before)


# --- mixing ---------------------------------------------------------------------------------------
MIX = [("mt", 2, {"adapter": {"bottleneck": 8}}), ("nlg", 4, {"lora": {"r": 2}}),
       ("qa", 1, {"prefix": {"length": 3, "hidden": 8}}), ("dialogue", 0, {"prompt": {"length": 4}}),
       ("summarization", 3, {"ptuning": {"length": 2, "encoder": "mlp"},
                             "lora": {"r": 3, "targets": ["k", "mlp_fc"]}})]


def mixed_model():
    specs = [TaskSpec(name, task_id, builtin_token_ids(name), methods) for name, task_id, methods in MIX]
    return randomize(VersatileLM(base_gpt2(), specs))


def mixed_batch():
    tids = torch.tensor([2, 4, 1, 0, 3, -1, 4, 0])
    ids = torch.randint(0, 50257, (8, 12), generator=torch.Generator().manual_seed(9))
    virtual = torch.full((8, 12), -1)
    for row, task in enumerate(tids.tolist()):
        n = {0: 4, 3: 2}.get(task, 0)
        virtual[row, :n] = torch.arange(n)
    return ids, tids, virtual


def test_rows_of_every_method_in_one_batch_equal_each_row_alone():
    model = mixed_model().eval()
    ids, tids, virtual = mixed_batch()
    with torch.no_grad():
        mixed = model(ids, token_type_ids=ids, task_ids=tids, virtual_ids=virtual).logits
        plain = model(ids, token_type_ids=ids).logits
        for row, task in enumerate(tids.tolist()):
            alone = model(ids[row:row + 1], token_type_ids=ids[row:row + 1], task_ids=task,
                          virtual_ids=virtual[row:row + 1]).logits[0]
            torch.testing.assert_close(mixed[row], alone, rtol=0, atol=1e-5)
            assert torch.equal(mixed[row].argmax(-1), alone.argmax(-1))
            if task == -1:
                assert torch.equal(alone, plain[row])
            else:
                assert (alone - plain[row]).abs().max() > 1e-3, task


@pytest.mark.parametrize("routing", ["gather", "slice"])
def test_batched_lora_routing_equals_per_task_sub_batches(monkeypatch, routing):
    specs = [TaskSpec("mt", 2, builtin_token_ids("mt"), {"lora": {"r": 2}}),
             TaskSpec("nlg", 4, builtin_token_ids("nlg"), {"lora": {"r": 5, "targets": ["q", "mlp_proj"]}})]
    model = randomize(VersatileLM(base_gpt2(), specs)).eval()
    ids = IDS.repeat(2, 1)
    tids = torch.tensor([2, 4, -1, 4, 2, 2])
    monkeypatch.setattr(lora_module, "ROUTING", routing)
    with torch.no_grad():
        mixed = model(ids, task_ids=tids).logits
        for row, task in enumerate(tids.tolist()):
            torch.testing.assert_close(mixed[row], model(ids[row:row + 1], task_ids=task).logits[0], rtol=0,
                                       atol=1e-5)


def test_batched_lora_gradients_equal_per_task_sub_batches(monkeypatch):
    """Training through the batched gathers: every LoRA tensor gets the gradient the per-task
    sub-batches give it (ranks 2 and 5, partly different targets, a plain row, a task-less slot)."""
    specs = [TaskSpec("mt", 2, builtin_token_ids("mt"), {"lora": {"r": 2, "dropout": 0.0}}),
             TaskSpec("nlg", 4, builtin_token_ids("nlg"),
                      {"lora": {"r": 5, "dropout": 0.0, "targets": ["q", "mlp_proj"]}})]
    model = randomize(VersatileLM(base_gpt2(), specs)).eval()  # eval: GPT-2's own dropout off
    model.mark_trainable("adapter", ["mt", "nlg"])
    ids, tids = IDS.repeat(2, 1), torch.tensor([2, 4, -1, 4, 2, 2])
    grads = {}
    for routing in ("gather", "slice"):
        monkeypatch.setattr(lora_module, "ROUTING", routing)
        model.zero_grad(set_to_none=True)
        model(ids, token_type_ids=ids, task_ids=tids, labels=ids).loss.backward()
        grads[routing] = {n: p.grad.clone() for n, p in model.named_parameters() if ".pairs." in n}
    assert set(grads["gather"]) == set(grads["slice"]) and len(grads["gather"]) == 2 * 2 * 2 + 2 * 2 * 2
    for name, grad in grads["slice"].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads["gather"][name], grad, rtol=1e-4, atol=1e-7)


def test_a_mixed_training_batch_gives_gradients_only_to_each_rows_task():
    model = mixed_model()
    model.mark_trainable("adapter", [name for name, _, _ in MIX])
    model.train()
    ids, tids, virtual = mixed_batch()
    labels = ids.clone()
    labels[:, :5] = -100
    for task_name, task_id, _ in MIX:
        model.zero_grad(set_to_none=True)
        rows = (tids == task_id).nonzero().flatten()
        keep = labels.clone()
        keep[[r for r in range(8) if r not in rows.tolist()]] = -100  # only this task's rows are scored
        model(ids, token_type_ids=ids, task_ids=tids, virtual_ids=virtual, labels=keep).loss.backward()
        for other in model.tasks.values():
            grads = [p.grad for p in other.methods.parameters()]
            if other.name == task_name:
                assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), task_name
            else:
                assert all(g is None or torch.count_nonzero(g) == 0 for g in grads), (task_name, other.name)


def test_the_prefix_cache_follows_rows_leaving_the_batch():
    model = mixed_model().eval()
    ids, tids, virtual = mixed_batch()
    with torch.no_grad():
        full = model(ids, token_type_ids=ids, task_ids=tids, virtual_ids=virtual).logits
        first = model(ids[:, :7], token_type_ids=ids[:, :7], task_ids=tids, virtual_ids=virtual[:, :7],
                      use_cache=True)
        keep = torch.tensor([0, 2, 4, 5])
        first.cache.batch_select_indices(keep)
        rest = model(ids[keep, 7:], token_type_ids=ids[keep, 7:], task_ids=tids[keep],
                     virtual_ids=virtual[keep, 7:], cache=first.cache, use_cache=True,
                     attention_mask=torch.ones(4, 12, dtype=torch.long),
                     position_ids=torch.arange(7, 12).expand(4, 5))
    torch.testing.assert_close(rest.logits, full[keep, 7:], rtol=0, atol=1e-5)
    assert math.isfinite(rest.logits.abs().max().item())
