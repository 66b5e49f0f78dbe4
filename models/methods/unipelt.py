"""`unipelt`: LoRA, prefix tuning and a bottleneck adapter, each behind a learned gate (Mao et al.
2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning").

    LoRA (q, v):  out_t <- out_t + G_L,t B A x_t           G_L,t = sigmoid(W_L x_t + b_L),
                                                            x: the projection's input
    prefix:       prefix scores and values scaled by G_P,t  G_P,t = sigmoid(W_P x_t + b_P),
                                                            x: the attention's input
    adapter:      out_t <- out_t + G_A,t (W_up ReLU(W_down out_t + b_down) + b_up)
                                                            G_A,t = sigmoid(W_A out_t + b_A),
                                                            out: the MLP's output

Every gate is one number per TOKEN t, from that token's input to the submodule. The authors'
code and AdapterHub (both for BERT) average the sigmoid over the sequence, one gate per row;
in a causal decoder that would make token t's output depend on later tokens and on how much
of the sequence is present, so cached step-by-step decoding would not equal the full forward.
Per-token gates keep GPT-2 causal, and a KV cache exact. The prefix gate scales, for query t,
the prefix keys' scores and the prefix values by G_P,t (AdapterHub's shared gate for both;
models/memory.py gated_prefix_attention).

Defaults: AdapterHub's UniPELTConfig, from the paper: LoRA r 8 on W_q and W_v (no dropout),
prefix length 10 trained through the prefix MLP (hidden 512; the saved form is the plain
(P, 2 L d) prefix, as `prefix`), adapter reduction factor 16 (b = d / 16, ReLU, the SeqBn
adapter) after the MLP. The LoRA update is scaled by its gate alone: with gating, both the
authors' code and AdapterHub replace LoRA's alpha / r by the gate (UniPELTConfig's alpha = 2
then has no effect), so there is no alpha option. Init: LoRA as `lora` (A Kaiming-uniform,
B = 0), the prefix as `prefix`, the adapter N(0, 0.02) weights and zero biases (AdapterHub's
"bert" init), gates N(0, 0.02) weights and zero biases (each starts near 1/2; AdapterHub leaves
the prefix and LoRA gates' biases at nn.Linear's default, our choice is zero). The adapter sits
on the MLP's output before its residual add (the paper's placement after the feed-forward
sub-layer; AdapterHub's GPT-2 wiring adds the residual stream to the adapter's input).
"""
import torch
from torch import nn

from models.methods.base import Method
from models.methods.houlsby import Bottleneck, bottleneck_size
from models.methods.lora import TARGETS, LowRankPair, _add_columns
from models.methods.prefix import PrefixMethod

REDUCTION = 16
GATE_STD = 0.02


def gate(d):
    linear = nn.Linear(d, 1)
    nn.init.normal_(linear.weight, mean=0.0, std=GATE_STD)
    nn.init.zeros_(linear.bias)
    return linear


def lora_shape(shape, target):
    projection, part = TARGETS[target]
    in_features, out_features = shape.linear_shape(projection)
    return in_features, shape.d_model if part is not None else out_features


class UniPELTMethod(Method):
    name = "unipelt"
    title = "gated LoRA + gated prefix + gated adapter"
    reference = "Mao et al. 2022"
    points = frozenset({"linear", "prefix", "prefix_gate", "mlp_output"})
    dense_tensors = ("prefix.",)  # its prefix as `prefix`'s; LoRA and adapter weights are pruned
    defaults = {"lora_r": 8, "lora_targets": ["q", "v"], "lora_dropout": 0.0, "prefix_length": 10,
                "prefix_hidden": 512, "reparameterize": True, "bottleneck": 0}
    help = {"lora_r": "LoRA rank", "lora_targets": f"projections LoRA adapts: {', '.join(TARGETS)}",
            "lora_dropout": "dropout on LoRA's input", "prefix_length": "prefix length P",
            "prefix_hidden": "hidden size of the prefix's reparameterization MLP",
            "reparameterize": "train the prefix through the MLP (the saved form is always the plain prefix)",
            "bottleneck": f"adapter bottleneck size b (0: d / {REDUCTION})"}

    def __init__(self, shape, options=None, backbone=None):
        super().__init__(shape, options, backbone)
        o, d = self.options, shape.d_model
        self.lora = nn.ModuleDict()
        self.lora_gates = nn.ModuleDict()
        for layer in range(shape.n_layer):
            for target in o["lora_targets"]:
                in_features, out_features = lora_shape(shape, target)
                self.lora[f"{layer}_{target}"] = LowRankPair(in_features, out_features, o["lora_r"])
                self.lora_gates[f"{layer}_{target}"] = gate(in_features)
        self.lora_drop = nn.Dropout(o["lora_dropout"])
        self.prefix = PrefixMethod(shape, {"length": o["prefix_length"], "hidden": o["prefix_hidden"],
                                           "reparameterize": o["reparameterize"]})
        self.prefix_gates = nn.ModuleList([gate(d) for _ in range(shape.n_layer)])
        b = bottleneck_size(shape, o, REDUCTION)
        self.adapters = nn.ModuleList()
        for _ in range(shape.n_layer):
            adapter = Bottleneck(d, b, "relu")
            for linear in (adapter.down, adapter.up):
                nn.init.normal_(linear.weight, mean=0.0, std=shape.init_std)
                nn.init.zeros_(linear.bias)
            self.adapters.append(adapter)
        self.adapter_gates = nn.ModuleList([gate(d) for _ in range(shape.n_layer)])

    @classmethod
    def check(cls, options, where):
        cls.require(options["lora_r"] >= 1, where, f"lora_r must be at least 1, got {options['lora_r']}")
        cls.require(0 <= options["lora_dropout"] < 1, where,
                    f"lora_dropout must be in [0, 1), got {options['lora_dropout']}")
        cls.require(options["lora_targets"], where, "lora_targets: name at least one projection")
        for target in options["lora_targets"]:
            cls.require(target in TARGETS, where,
                        f"lora_targets: unknown target {target!r} (choose from {', '.join(TARGETS)})")
        cls.require(len(set(options["lora_targets"])) == len(options["lora_targets"]), where,
                    "lora_targets: a target is named twice")
        cls.require(options["prefix_length"] >= 1, where,
                    f"prefix_length must be at least 1, got {options['prefix_length']}")
        cls.require(options["prefix_hidden"] >= 1, where,
                    f"prefix_hidden must be at least 1, got {options['prefix_hidden']}")
        cls.require(options["bottleneck"] >= 0, where,
                    f"bottleneck must be at least 1 (or 0: d / {REDUCTION}), got {options['bottleneck']}")

    @classmethod
    def parameter_count(cls, shape, options):
        d, L = shape.d_model, shape.n_layer
        lora = 0
        for target in options["lora_targets"]:
            in_features, out_features = lora_shape(shape, target)
            lora += options["lora_r"] * (in_features + out_features) + (in_features + 1)  # A, B, gate
        prefix = PrefixMethod.parameter_count(shape, {"length": options["prefix_length"],
                                                      "hidden": options["prefix_hidden"],
                                                      "reparameterize": options["reparameterize"]})
        adapter = Bottleneck.count(d, bottleneck_size(shape, options, REDUCTION)) + (d + 1)
        return L * lora + prefix + L * (d + 1) + L * adapter

    # --- LoRA ----------------------------------------------------------------------------------
    def linear_targets(self):
        return {(layer, TARGETS[t][0]) for layer in range(self.shape.n_layer)
                for t in self.options["lora_targets"]}

    def linear(self, layer, name, x, out):  # x: (n, T, in), out: (n, T, out)
        d = self.shape.d_model
        for target in self.options["lora_targets"]:
            projection, part = TARGETS[target]
            if projection != name:
                continue
            lo, hi = (part * d, (part + 1) * d) if part is not None else (0, out.shape[-1])
            key = f"{layer}_{target}"
            pair = self.lora[key]
            g = torch.sigmoid(self.lora_gates[key](x))                          # (n, T, 1)
            delta = (self.lora_drop(x) @ pair.A.t()) @ pair.B.t() * g
            out = _add_columns(out, delta, lo, hi)
        return out

    # --- prefix ----------------------------------------------------------------------------------
    @property
    def prefix_length(self):
        return self.options["prefix_length"]

    def prefix_kv(self):
        return self.prefix.prefix_kv()

    def prefix_gate(self, layer, x):  # x: the attention's input (n, T, d) -> (n, T)
        return torch.sigmoid(self.prefix_gates[layer](x)).squeeze(-1)

    # --- adapter ---------------------------------------------------------------------------------
    def mlp_output(self, layer, x, out):  # out: the MLP's output (n, T, d)
        return out + torch.sigmoid(self.adapter_gates[layer](out)) * self.adapters[layer](out)

    def exported(self):
        if not self.options["reparameterize"]:
            return self
        flat = UniPELTMethod(self.shape, dict(self.options, reparameterize=False))
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("prefix.")}
        with torch.no_grad():
            state["prefix.prefixes"] = self.prefix.all_prefixes().detach().clone()
        flat.load_state_dict(state)
        weight = self.prefix.embedding.weight
        return flat.to(device=weight.device, dtype=weight.dtype)
