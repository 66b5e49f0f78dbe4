"""The seven further methods (houlsby, parallel, ln, adapterbias, compacter, krona, unipelt):
parameter counts by formula on GPT-2 small's shape, each method against its paper's equations
written out here (sub-layer inputs captured by hooks on GPT-2's own modules, registered before
the model's), LN-tuning against HF PEFT's, rows of all methods in one left-padded batch equal to
each row alone (also step by step under the KV cache), gradients only for each row's own task,
option errors, exported forms."""
import math
import warnings

import pytest
import torch
from conftest import tiny_gpt2

from models.methods import METHODS, BackboneShape, method_class
from models.vlm import TaskSpec, VersatileLM, add_special_token_rows
from utils.errors import VLMError
from utils.vocab import builtin_token_ids

SMALL = BackboneShape(n_layer=12, d_model=768, n_head=12, d_inner=3072)
NEW = ("houlsby", "parallel", "ln", "adapterbias", "compacter", "krona", "unipelt")
# Options that fit the tiny GPT-2 (d = 64): compacter's default bottleneck d/32 = 2 is no multiple of
# phm_dim 4.
TINY_OPTIONS = {"houlsby": {}, "parallel": {}, "ln": {}, "adapterbias": {}, "compacter": {"bottleneck": 8},
                "krona": {}, "unipelt": {"prefix_length": 3, "prefix_hidden": 32}}


def base_gpt2(seed=0):
    gpt2 = tiny_gpt2(seed)
    add_special_token_rows(gpt2)
    return gpt2


def randomize(model, std=0.1, seed=1):
    """Every method tensor moved off its init (zero-initialized B's, up-projections, vectors)."""
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


def one_task_model(name, options=None, gpt2=None):
    model = VersatileLM(gpt2 if gpt2 is not None else base_gpt2(),
                        [TaskSpec("t", 0, (), {name: TINY_OPTIONS[name] if options is None else options})])
    return randomize(model.eval())


def ids(batch=2, length=7, seed=3):
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- parameter counts ------------------------------------------------------------------------
D, L, INNER = 768, 12, 3072
UNIPELT_LORA = L * 2 * (8 * (D + D) + (D + 1))                                 # A, B, gate on q and v
UNIPELT_PREFIX_MLP = 10 * D + (D * 512 + 512) + (512 * 2 * L * D + 2 * L * D)
UNIPELT_REST = L * (D + 1) + L * (D * 48 + 48 + 48 * D + D + (D + 1))       # prefix gates; adapter + its gate


@pytest.mark.parametrize("name, options, formula", [
    ("houlsby", {}, 12 * 2 * (768 * 48 + 48 + 48 * 768 + 768)),                      # 1,789,056
    ("houlsby", {"bottleneck": 64}, 12 * 2 * (768 * 64 + 64 + 64 * 768 + 768)),
    ("parallel", {}, 12 * (768 * 384 + 384 + 384 * 768 + 768)),                      # 7,091,712
    ("ln", {}, (2 * 12 + 1) * 2 * 768),                                             # 38,400
    ("adapterbias", {}, 12 * 768 + 12 * (3072 + 1)),                                 # 46,092
    ("adapterbias", {"score_input": "output"}, 12 * 768 + 12 * (768 + 1)),
    ("adapterbias", {"share_alpha": True}, 12 * 768 + (3072 + 1)),
    ("compacter", {}, 4 ** 3 + 12 * 2 * ((768 + 24) + 24 + (24 + 768) + 768)),        # 57,088
    ("compacter", {"phm_rank": 2, "phm_bias": False}, 4 ** 3 + 12 * 2 * (2 * (768 + 24) + 2 * (24 + 768))),
    ("krona", {}, 12 * 2 * (24 * 24 + 32 * 32)),                                    # 38,400
    ("krona", {"a1": 16, "a2": 48, "targets": ["q", "mlp_fc"]},
     12 * ((16 * 48 + 48 * 16) + (16 * 48 + 192 * 16))),
    ("unipelt", {}, UNIPELT_LORA + UNIPELT_PREFIX_MLP + UNIPELT_REST),              # 11,083,376 trained
    ("unipelt", {"reparameterize": False}, UNIPELT_LORA + 10 * 2 * L * D + UNIPELT_REST),  # 1,410,672 saved
])
def test_parameter_counts_equal_the_formulas_on_gpt2_small(name, options, formula):
    resolved = method_class(name).resolve(options)
    assert counted(name, options) == method_class(name).parameter_count(SMALL, resolved) == formula


@pytest.mark.parametrize("d, phm_dim, bottleneck", [(768, 4, 24), (1024, 4, 32), (1280, 4, 40), (1600, 4, 48),
                                                     (64, 4, 4), (64, 2, 2), (128, 4, 4)])
def test_compacters_default_bottleneck_is_d_over_32_rounded_to_a_multiple_of_phm_dim(d, phm_dim, bottleneck):
    from models.methods.compacter import bottleneck_size
    shape = BackboneShape(n_layer=1, d_model=d, n_head=4, d_inner=4 * d)
    options = method_class("compacter").resolve({"phm_dim": phm_dim})
    assert bottleneck_size(shape, options) == bottleneck
    with torch.device("meta"):  # and it builds
        module = method_class("compacter")(shape, options)
    assert module.adapters["0_attn"].down.right.shape[-1] == bottleneck // phm_dim


def test_compacters_slow_weights_are_one_tensor_for_the_whole_task():
    with torch.device("meta"):
        module = method_class("compacter")(SMALL, {})
    rules = [name for name, p in module.named_parameters() if p.shape == (4, 4, 4)]
    assert rules == ["rule"]


@pytest.mark.parametrize("name", NEW)
def test_the_printed_trainable_count_is_the_formula_plus_the_task_rows(name):
    gpt2 = base_gpt2()
    rows = builtin_token_ids("mt")
    model = VersatileLM(gpt2, [TaskSpec("mt", 0, rows, {name: TINY_OPTIONS[name]})])
    shape = BackboneShape.of(gpt2.config)
    formula = method_class(name).parameter_count(shape, method_class(name).resolve(TINY_OPTIONS[name]))
    assert model.count_trainable("adapter", "mt") == formula + len(rows) * 64


def test_the_registry_keeps_the_issues_table_order():
    assert list(METHODS) == ["adapter", "houlsby", "parallel", "lora", "prefix", "prompt", "ptuning", "ln",
                             "adapterbias", "compacter", "krona", "unipelt"]


# --- the papers' equations ----------------------------------------------------------------------
class Taps:
    """(input, output) of GPT-2 modules in the last forward, from hooks registered now: taps made
    before the model's hooks see the sub-layer untouched, taps made after see what the model made."""

    def __init__(self, modules):
        self.seen = {}
        for key, module in modules.items():
            module.register_forward_hook(self._hook(key))

    def _hook(self, key):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.seen[key] = (args[0].detach().clone(), out.detach().clone())
        return hook

    def x(self, key):
        return self.seen[key][0]

    def out(self, key):
        return self.seen[key][1]


def tapped(gpt2):
    modules = {"ln_f": gpt2.transformer.ln_f}
    for i, block in enumerate(gpt2.transformer.h):
        modules.update({(i, "ln_1"): block.ln_1, (i, "ln_2"): block.ln_2, (i, "attn"): block.attn,
                        (i, "mlp"): block.mlp, (i, "c_attn"): block.attn.c_attn,
                        (i, "c_proj"): block.mlp.c_proj})
    return modules


def run_tapped(name, options=None):
    """(method, before taps, after taps) after one forward of a one-task model."""
    gpt2 = base_gpt2()
    before = Taps(tapped(gpt2))
    model = one_task_model(name, options, gpt2)
    after = Taps(tapped(gpt2))
    with torch.no_grad():
        model(ids(), task_ids=0)
    return model.tasks["t"].methods[name], before, after


def swish(z):
    return z * torch.sigmoid(z)


def gelu(z):
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def bottleneck(x, adapter, f):
    return f(x @ adapter.down.weight.t() + adapter.down.bias) @ adapter.up.weight.t() + adapter.up.bias


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_houlsby_is_the_papers_adapter_after_attention_and_after_the_mlp():
    method, before, after = run_tapped("houlsby")
    assert method.adapters["0_attn"].down.out_features == 64 // 16
    for i in range(2):
        for where, key in (("attn", (i, "attn")), ("mlp", (i, "mlp"))):
            out = before.out(key)
            close(after.out(key), out + bottleneck(out, method.adapters[f"{i}_{where}"], swish))
            assert (after.out(key) - out).abs().max() > 1e-3


def test_parallel_is_a_scaled_adapter_on_the_mlps_input():
    method, before, after = run_tapped("parallel")
    assert method.adapters[0].down.out_features == 64 // 2
    for i in range(2):
        x, out = before.x((i, "mlp")), before.out((i, "mlp"))
        close(after.out((i, "mlp")), out + 4.0 * bottleneck(x, method.adapters[i], torch.relu))
        close(x, after.out((i, "ln_2")))  # the MLP's input is ln_2's output


def test_fresh_parallel_ln_krona_and_adapterbias_tasks_are_gpt2_itself():
    plain = base_gpt2()
    for name in ("parallel", "ln", "krona", "adapterbias"):
        model = VersatileLM(base_gpt2(), [TaskSpec("t", 0, (), {name: TINY_OPTIONS[name]})]).eval()
        with torch.no_grad():
            close(model(ids(), task_ids=0).logits, plain(ids()).logits)


def test_ln_is_the_layernorm_equation_with_the_tasks_gain_and_bias():
    method, before, after = run_tapped("ln")
    for key, norm in [((0, "ln_1"), "0_ln_1"), ((1, "ln_2"), "1_ln_2"), ("ln_f", "ln_f")]:
        x = before.x(key)
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        w, b = method.norms[norm].weight, method.norms[norm].bias
        close(after.out(key), (x - mean) / torch.sqrt(var + 1e-5) * w + b)


def test_ln_starts_from_the_backbones_layernorms():
    gpt2 = base_gpt2()
    with torch.no_grad():
        gpt2.transformer.h[1].ln_2.weight.mul_(1.5)
        gpt2.transformer.ln_f.bias.add_(0.25)
    model = VersatileLM(gpt2, [TaskSpec("t", 0, (), {"ln": {}})])
    norms = model.tasks["t"].methods["ln"].norms
    assert torch.equal(norms["1_ln_2"].weight, gpt2.transformer.h[1].ln_2.weight)
    assert torch.equal(norms["ln_f"].bias, gpt2.transformer.ln_f.bias)


def test_ln_agrees_with_peft_ln_tuning():
    from peft import LNTuningConfig, get_peft_model
    from peft.tuners.ln_tuning.layer import LNTuningLayer
    model = one_task_model("ln")
    method = model.tasks["t"].methods["ln"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(base_gpt2(),
                                   LNTuningConfig(target_modules=["ln_1", "ln_2", "ln_f"])).eval()
        transformer = reference.base_model.model.transformer
        copied = 0
        for layer, name in method.norm_names():
            wrapped = transformer.ln_f if layer == -1 else getattr(transformer.h[layer], name)
            assert isinstance(wrapped, LNTuningLayer)
            with torch.no_grad():
                wrapped.ln_tuning_layers["default"].weight.copy_(method.norms[method.key(layer, name)].weight)
                wrapped.ln_tuning_layers["default"].bias.copy_(method.norms[method.key(layer, name)].bias)
            copied += 1
        assert copied == 2 * 2 + 1
        with torch.no_grad():
            theirs = reference(input_ids=ids()).logits
    with torch.no_grad():
        ours = model(ids(), task_ids=0).logits
        assert (ours - base_gpt2()(ids()).logits).abs().max() > 1e-3
    close(ours, theirs)


def test_adapterbias_shifts_the_mlp_output_by_a_vector_times_a_score_of_the_hidden_activation():
    method, before, after = run_tapped("adapterbias")
    assert method.alphas[0].in_features == 4 * 64
    for i in range(2):
        r, out = before.x((i, "c_proj")), before.out((i, "c_proj"))
        alpha = r @ method.alphas[i].weight.t() + method.alphas[i].bias  # (batch, T, 1): one score a token
        close(after.out((i, "c_proj")), out + alpha * method.vectors[i])


def test_adapterbias_scoring_the_mlp_output():
    method, before, after = run_tapped("adapterbias", {"score_input": "output", "share_alpha": True})
    assert len(method.alphas) == 1
    for i in range(2):
        out = before.out((i, "mlp"))
        alpha = out @ method.alphas[0].weight.t() + method.alphas[0].bias
        close(after.out((i, "mlp")), out + alpha * method.vectors[i])


def phm_weight(rule, layer):
    """sum_i A_i (x) B_i with B_i = s_i t_i^T, by torch.kron."""
    return sum(torch.kron(rule[i], layer.left[i] @ layer.right[i]) for i in range(rule.shape[0]))


def test_compacter_is_a_houlsby_adapter_with_kronecker_sum_projections():
    method, before, after = run_tapped("compacter")
    rule = method.rule
    for i in range(2):
        for where, key in (("attn", (i, "attn")), ("mlp", (i, "mlp"))):
            adapter = method.adapters[f"{i}_{where}"]
            down, up = phm_weight(rule, adapter.down), phm_weight(rule, adapter.up)
            assert down.shape == (64, 8) and up.shape == (8, 64)
            out = before.out(key)
            expected = out + gelu(out @ down + adapter.down.bias) @ up + adapter.up.bias
            close(after.out(key), expected)


def test_compacters_shared_weights_act_in_every_layer():
    model = one_task_model("compacter")
    method = model.tasks["t"].methods["compacter"]
    loss = model(ids(), task_ids=0).logits.square().mean()
    loss.backward()
    assert method.rule.grad is not None and method.rule.grad.abs().max() > 0
    # the rule is the only (n, n, n) tensor and each layer's fast weights are its own
    assert method.adapters["0_attn"].down.left is not method.adapters["1_attn"].down.left


def test_krona_adds_the_kronecker_product_update_to_q_and_v():
    method, before, after = run_tapped("krona")
    pair = method.pairs["0_q"]
    assert pair.A.shape == (8, 8) and pair.B.shape == (8, 8)  # d = 64: the divisor closest to sqrt(64)
    for i in range(2):
        x, out = before.x((i, "c_attn")), before.out((i, "c_attn"))
        dq = x @ torch.kron(method.pairs[f"{i}_q"].A, method.pairs[f"{i}_q"].B).t()
        dv = x @ torch.kron(method.pairs[f"{i}_v"].A, method.pairs[f"{i}_v"].B).t()
        close(after.out((i, "c_attn")), out + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1))


def test_krona_with_rectangular_factors_on_the_mlp():
    method, before, after = run_tapped("krona", {"a1": 4, "a2": 16, "targets": ["mlp_fc", "mlp_proj"],
                                                 "scale": 2.0})
    assert method.pairs["0_mlp_fc"].B.shape == (256 // 4, 64 // 16)
    for i in range(2):
        pair = method.pairs[f"{i}_mlp_proj"]
        x, out = before.x((i, "c_proj")), before.out((i, "c_proj"))
        close(after.out((i, "c_proj")), out + 2.0 * x @ torch.kron(pair.A, pair.B).t())


def test_krona_defaults_on_gpt2_small_are_balanced_factors():
    from models.methods.krona import balanced_divisor
    assert balanced_divisor(768) == 24 and balanced_divisor(64) == 8 and balanced_divisor(1024) == 32


def test_unipelt_is_gated_lora_plus_gated_prefix_plus_gated_adapter():
    method, before, after = run_tapped("unipelt")
    s = BackboneShape.of(base_gpt2().config)
    H, hd, P = s.n_head, s.head_dim, 3
    # the prefix, through its MLP: embeddings -> Linear -> tanh -> Linear, (P, 2 L d) as (P, 2L, heads, hd)
    p = method.prefix
    kv = torch.tanh(p.embedding.weight @ p.transform[0].weight.t() + p.transform[0].bias) \
        @ p.transform[2].weight.t() + p.transform[2].bias
    kv = kv.view(P, 2 * s.n_layer, H, hd)
    for i in range(2):
        # LoRA on q and v, each scaled by its own per-token gate from c_attn's input
        x, out = before.x((i, "c_attn")), before.out((i, "c_attn"))
        deltas = []
        for target in ("q", "k", "v"):
            if target == "k":
                deltas.append(torch.zeros_like(out[..., :64]))
                continue
            pair, g = method.lora[f"{i}_{target}"], method.lora_gates[f"{i}_{target}"]
            gate = torch.sigmoid(x @ g.weight.t() + g.bias)                               # (batch, T, 1)
            deltas.append(gate * (x @ pair.A.t() @ pair.B.t()))
        qkv = after.out((i, "c_attn"))
        close(qkv, out + torch.cat(deltas, dim=-1))
        # attention with the gated prefix: prefix scores g_t q.k / sqrt(hd), prefix values g_t v
        attn_in = before.x((i, "attn"))
        g = method.prefix_gates[i]
        gate = torch.sigmoid(attn_in @ g.weight.t() + g.bias)[:, None]                    # (batch, 1, T, 1)
        batch, T, _ = qkv.shape
        q, k, v = (t.view(batch, T, H, hd).transpose(1, 2) for t in qkv.split(64, dim=-1))
        pk, pv = kv[:, 2 * i].transpose(0, 1)[None], kv[:, 2 * i + 1].transpose(0, 1)[None]  # (1, H, P, hd)
        prefix_scores = gate * (q @ pk.transpose(-1, -2)) / math.sqrt(hd)
        own_scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        own_scores = own_scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        probs = torch.softmax(torch.cat([prefix_scores, own_scores], dim=-1), dim=-1)
        mixed = (gate * probs[..., :P]) @ pv + probs[..., P:] @ v
        # GPT-2's own (identical) projection, Conv1D x W + b
        c_proj = base_gpt2().transformer.h[i].attn.c_proj
        attn_out = mixed.transpose(1, 2).reshape(batch, T, 64) @ c_proj.weight + c_proj.bias
        close(after.out((i, "attn")), attn_out)
        # the adapter after the MLP, gated per token from the MLP's output
        out = before.out((i, "mlp"))
        g = method.adapter_gates[i]
        gate = torch.sigmoid(out @ g.weight.t() + g.bias)
        close(after.out((i, "mlp")), out + gate * bottleneck(out, method.adapters[i], torch.relu))


def test_unipelt_gates_are_per_token_not_sequence_means():
    """Token t's output must not depend on later tokens (causal): the prefix of a sequence gives
    the same logits as the start of the whole sequence."""
    model = one_task_model("unipelt")
    sequence = ids(2, 9)
    with torch.no_grad():
        whole = model(sequence, task_ids=0).logits
        start = model(sequence[:, :4], task_ids=0).logits
    close(start, whole[:, :4])


# --- one batch, many methods ------------------------------------------------------------------
MIXED = [("dialogue", 0, "houlsby", {}), ("qa", 1, "parallel", {}), ("mt", 2, "ln", {}),
         ("summarization", 3, "adapterbias", {}), ("nlg", 4, "compacter", {"bottleneck": 8}),
         ("user_krona", 5, "krona", {}),
         ("user_unipelt", 6, "unipelt", {"prefix_length": 3, "prefix_hidden": 32}),
         # a longer prefix: unipelt's rows get padded
         ("user_prefix", 7, "prefix", {"length": 5, "hidden": 16})]


def mixed_model():
    specs = [TaskSpec(name, task_id, builtin_token_ids(name), {method: options})
             for name, task_id, method, options in MIXED]
    return randomize(VersatileLM(base_gpt2(), specs).eval())


def left_padded(lengths, seed=5):
    """Rows of the given lengths, left-padded: (ids, attention_mask, position_ids)."""
    width = max(lengths)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50257, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return tokens, mask, positions


TASK_IDS = torch.tensor([t for _, t, _, _ in MIXED] + [-1])
LENGTHS = [9, 6, 8, 5, 9, 7, 4, 8, 6]


def test_rows_of_every_method_in_one_left_padded_batch_equal_each_row_alone():
    model, plain = mixed_model(), base_gpt2()
    tokens, mask, positions = left_padded(LENGTHS)
    with torch.no_grad():
        batch = model(tokens, task_ids=TASK_IDS, attention_mask=mask, position_ids=positions).logits
        for row, n in enumerate(LENGTHS):
            alone_ids = tokens[row:row + 1, -n:]
            alone = model(alone_ids, task_ids=int(TASK_IDS[row])).logits[0]
            close(batch[row, -n:], alone)
            if TASK_IDS[row] >= 0:
                assert (alone - plain(alone_ids).logits[0]).abs().max() > 1e-3, MIXED[row]
            else:
                close(alone, plain(alone_ids).logits[0])


def test_the_mixed_batch_decodes_step_by_step_under_the_kv_cache_as_in_one_pass():
    model = mixed_model()
    tokens, mask, positions = left_padded(LENGTHS)
    width, start = tokens.shape[1], 5
    with torch.no_grad():
        full = model(tokens, task_ids=TASK_IDS, attention_mask=mask, position_ids=positions).logits
        step = model(tokens[:, :start], task_ids=TASK_IDS, attention_mask=mask[:, :start],
                     position_ids=positions[:, :start], use_cache=True)
        assert type(step.cache).__name__ == "PrefixCache"
        close(step.logits[mask[:, :start].bool()], full[:, :start][mask[:, :start].bool()])
        for t in range(start, width):
            step = model(tokens[:, t:t + 1], task_ids=TASK_IDS, attention_mask=mask[:, :t + 1],
                         position_ids=positions[:, t:t + 1], cache=step.cache, use_cache=True)
            close(step.logits[:, 0], full[:, t])


def test_a_mixed_training_batch_gives_gradients_only_to_each_rows_task():
    model = mixed_model().train()
    names = [name for name, _, _, _ in MIXED]
    model.mark_trainable("adapter", names)
    tokens = ids(len(TASK_IDS), 8, seed=11)
    for own, own_id, _, _ in MIXED:
        model.zero_grad(set_to_none=True)
        labels = tokens.clone()
        labels[TASK_IDS != own_id] = -100
        model(tokens, task_ids=TASK_IDS, labels=labels).loss.backward()
        for name, task in model.tasks.items():
            for pname, p in task.methods.named_parameters():
                if name == own:
                    assert p.grad is not None and p.grad.abs().max() > 0, (own, pname)
                else:
                    assert p.grad is None or p.grad.abs().max() == 0, (own, name, pname)


# --- options -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, options, message", [
    ("houlsby", {"bottleneck": -1}, "bottleneck must be at least 1"),
    ("houlsby", {"bottleneck": "big"}, "option 'bottleneck' must be like 0"),
    ("parallel", {"scale": float("nan")}, "option 'scale'"),
    ("parallel", {"scale": 0}, "scale must not be 0"),
    ("parallel", {"bottleneck": -2}, "bottleneck must be at least 1"),
    ("ln", {"gain": 1.0}, "unknown option 'gain'"),
    ("adapterbias", {"score_input": "hidden"}, "score_input must be inner or output, got 'hidden'"),
    ("adapterbias", {"share_alpha": 1}, "option 'share_alpha'"),
    ("compacter", {"phm_dim": 0}, "phm_dim must be at least 1"),
    ("compacter", {"phm_rank": 0}, "phm_rank must be at least 1"),
    ("krona", {"a1": -1}, "a1 must be at least 1"),
    ("krona", {"targets": ["w_q"]}, "unknown target 'w_q'"),
    ("krona", {"dropout": 1.0}, "dropout must be in"),
    ("unipelt", {"lora_r": 0}, "lora_r must be at least 1"),
    ("unipelt", {"lora_targets": ["q", "q"]}, "lora_targets: a target is named twice"),
    ("unipelt", {"lora_targets": ["query"]}, "lora_targets: unknown target 'query'"),
    ("unipelt", {"prefix_length": 0}, "prefix_length must be at least 1"),
    ("unipelt", {"bottleneck": -1}, "bottleneck must be at least 1"),
])
def test_bad_options_are_errors_naming_the_option(name, options, message):
    with pytest.raises(VLMError, match=f"--method {name}: .*{message}"):
        method_class(name).resolve(options)


@pytest.mark.parametrize("name, options, message", [
    ("compacter", {"bottleneck": 2}, "phm_dim 4 must divide the bottleneck 2"),  # the default is 4 at d = 64
    ("compacter", {"bottleneck": 6}, "phm_dim 4 must divide the bottleneck 6"),
    ("compacter", {"phm_dim": 3, "bottleneck": 6}, "phm_dim 3 must divide the model width 64"),
    ("krona", {"a1": 7}, "a1=7 must divide the output width 64 of target q"),
    ("krona", {"a2": 48, "targets": ["mlp_proj"]},
     "a2=48 must divide the input width 256 of target mlp_proj"),
])
def test_options_that_do_not_fit_the_backbone_are_errors_naming_the_option(name, options, message):
    with pytest.raises(VLMError, match=message):
        VersatileLM(base_gpt2(), [TaskSpec("t", 0, (), {name: options})])


# --- exported forms -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_the_exported_form_gives_the_trained_logits_and_rebuilds_from_its_options(name):
    model = one_task_model(name)
    tokens = ids()
    with torch.no_grad():
        trained = model(tokens, task_ids=0).logits
    model.export_methods()
    exported = model.tasks["t"].methods[name]
    shape = BackboneShape.of(model.gpt2.config)
    assert sum(p.numel() for p in exported.parameters()) == method_class(name).parameter_count(
        shape, exported.options)
    with torch.no_grad():
        close(model(tokens, task_ids=0).logits, trained)
    rebuilt = VersatileLM(base_gpt2(), [model.tasks["t"].spec()]).eval()
    rebuilt.tasks["t"].load_state_dict(model.tasks["t"].state_dict())
    with torch.no_grad():
        close(rebuilt(tokens, task_ids=0).logits, trained)


def test_unipelt_exports_its_prefix_as_the_plain_prefix():
    model = one_task_model("unipelt")
    before = model.tasks["t"].methods["unipelt"]
    model.export_methods()
    after = model.tasks["t"].methods["unipelt"]
    assert after.options["reparameterize"] is False and before.options["reparameterize"] is True
    names = {n for n, _ in after.named_parameters()}
    assert "prefix.prefixes" in names and not any(n.startswith("prefix.transform") for n in names)
    torch.testing.assert_close(after.prefix.prefixes, before.prefix.all_prefixes(), rtol=0, atol=0)
