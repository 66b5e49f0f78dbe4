"""Our methods' tensors as Hugging Face PEFT stores them (adapter_config.json's settings and
adapter_model.safetensors' tensors) and back, for GPT-2: names, shapes and the arithmetic that
makes both sides one computation. Nothing here knows tasks or reads files (engines/peft_io.py
does); errors quote the file names they are given.

How our methods map (tests/test_peft_io.py loads exports into PEFT and compares logits):

- lora: our q, k, v are slices of GPT-2's fused c_attn, which PEFT adapts as one module, so our
  rank-r pairs on k of the three slices are one PEFT LoRA of rank k r and alpha k alpha (the same
  scale, alpha / r): A stacked in q, k, v order, B block-diagonal, each slice's B in its own
  columns (rank_pattern / alpha_pattern record c_attn's rank and alpha). attn_proj, mlp_fc and
  mlp_proj are whole modules on both sides. PEFT's lora_A / lora_B keep nn.Linear's layout on
  GPT-2's Conv1D as ours do (fan_in_fan_out only matters when PEFT merges). Back: c_attn's B is
  cut into its q, k, v column blocks; each block keeps the rank components its B uses (a block
  zero everywhere is no target), so an exported LoRA comes back tensor for tensor. Ranks are
  zero-padded to the largest; a module whose scale differs from the first has it folded into B.
- prefix: PEFT stores the (P, 2 L d) prefix (the projection's output, when it trained through
  one) in the layout ours has: position, then (layer, key|value), heads, head_dim.
- prompt and ptuning: PEFT stores the (n, d) virtual-token embeddings (p-tuning: its encoder's
  output), what our exported prompt / p-tuning table holds. Both export as prompt tuning.
- ln: PEFT keeps one trainable copy of each LayerNorm it targets; one it leaves alone keeps the
  backbone's gain and bias.
- a task's special-token rows: LoRA's trainable_token_indices. PEFT stores the rows themselves
  (they replace the embedding rows, and the tied output layer's).
"""
import math
import re
from dataclasses import dataclass, field

import torch

from models.methods.lora import TARGETS
from utils.errors import VLMError

PEFT_PREFIX = "base_model.model."
PROMPT_KEY = "prompt_embeddings"
TOKENS_KEY = PEFT_PREFIX + "transformer.wte.token_adapter.trainable_tokens_delta"
# Our method -> the PEFT type it exports as; a PEFT type -> our method it imports as.
EXPORT_TYPES = {"lora": "LORA", "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING",
                "ptuning": "PROMPT_TUNING", "ln": "LN_TUNING"}
IMPORT_METHODS = {"LORA": "lora", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "P_TUNING": "ptuning",
                  "LN_TUNING": "ln"}
# PEFT's module (inside a GPT-2 block) of each of our projections, and our targets on it.
MODULE_OF = {"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "mlp.c_fc",
             "mlp.c_proj": "mlp.c_proj"}
MODULE_TARGETS = {MODULE_OF[projection]: [t for t, (p, _) in TARGETS.items() if p == projection]
                  for projection in MODULE_OF}
LORA_KEY = re.compile(r"base_model\.model\.transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|"
                      r"mlp\.c_proj)\.lora_([AB])\.weight")
LN_KEY = re.compile(r"base_model\.model\.transformer\.(?:h\.(\d+)\.(ln_1|ln_2)|(ln_f))\.ln_tuning_layers\."
                    r"(weight|bias)")
# LoRA settings with no counterpart in ours, and the value that means "not used".
LORA_UNMAPPED = {"use_dora": False, "lora_bias": False, "bias": "none", "layer_replication": None,
                 "target_parameters": None, "alora_invocation_tokens": None, "use_qalora": False}


@dataclass
class Imported:
    """A PEFT adapter in our terms: one method with its options and module state dict, and the
    token rows it replaces ({} when none)."""
    method: str
    options: dict
    state: dict
    token_rows: dict = field(default_factory=dict)  # token id -> (d,) row


# --- ours -> PEFT --------------------------------------------------------------------------------
def base_config(peft_type):
    return {"peft_type": peft_type, "task_type": "CAUSAL_LM", "inference_mode": True,
            "base_model_name_or_path": None, "revision": None}


def to_peft(name, method, token_ids=(), token_rows=None):
    """(adapter_config dict, {tensor name: tensor}) of method `name`'s module in its saved form
    (exported()), with LoRA's token rows (token_rows (n, d) for token_ids) when given."""
    shape = method.shape
    if name == "lora":
        config, tensors = lora_to_peft(method)
        if token_ids:
            config["trainable_token_indices"] = list(token_ids)
            tensors[TOKENS_KEY] = token_rows
        return config, tensors
    if token_ids:
        raise ValueError(f"{name} has no PEFT form with token rows")
    if name == "prefix":
        config = dict(base_config("PREFIX_TUNING"), num_virtual_tokens=method.prefix_length,
                      prefix_projection=False, encoder_hidden_size=shape.d_model, **prompt_shape(shape))
        return config, {PROMPT_KEY: method.all_prefixes()}
    if name in ("prompt", "ptuning"):
        config = dict(base_config("PROMPT_TUNING"), num_virtual_tokens=method.num_virtual_tokens,
                      prompt_tuning_init="RANDOM", **prompt_shape(shape))
        return config, {PROMPT_KEY: method.virtual_tokens()}
    if name == "ln":
        tensors = {}
        for layer, norm in method.norm_names():
            module = method.norms[method.key(layer, norm)]
            where = "ln_f" if layer == -1 else f"h.{layer}.{norm}"
            for part in ("weight", "bias"):
                tensors[f"{PEFT_PREFIX}transformer.{where}.ln_tuning_layers.{part}"] = getattr(module, part)
        return dict(base_config("LN_TUNING"), target_modules=["ln_1", "ln_2", "ln_f"]), tensors
    raise ValueError(f"{name} has no PEFT counterpart")


def prompt_shape(shape):
    return {"token_dim": shape.d_model, "num_layers": shape.n_layer, "num_attention_heads": shape.n_head,
            "num_transformer_submodules": 1}


def fuse_c_attn(pairs, d):
    """[(part, A (r, d), B (d, r))] of q (part 0), k (1), v (2) -> PEFT's one LoRA on the fused
    c_attn: A (k r, d) stacked in part order, B (3 d, k r) with each B in its part's rows."""
    pairs = sorted(pairs, key=lambda pair: pair[0])
    a = torch.cat([A for _, A, _ in pairs])
    b = a.new_zeros(3 * d, a.shape[0])
    column = 0
    for part, A, B in pairs:
        b[part * d:(part + 1) * d, column:column + A.shape[0]] = B
        column += A.shape[0]
    return a, b


def lora_to_peft(method):
    o, d = method.options, method.shape.d_model
    fused = [t for t in o["targets"] if TARGETS[t][1] is not None]
    modules = [m for m in MODULE_TARGETS if any(t in o["targets"] for t in MODULE_TARGETS[m])]
    tensors = {}
    for layer in range(method.shape.n_layer):
        for module in modules:
            pairs = [(t, method.pairs[f"{layer}_{t}"]) for t in MODULE_TARGETS[module] if t in o["targets"]]
            if module == "attn.c_attn":
                a, b = fuse_c_attn([(TARGETS[t][1], pair.A, pair.B) for t, pair in pairs], d)
            else:
                a, b = pairs[0][1].A, pairs[0][1].B
            key = f"{PEFT_PREFIX}transformer.h.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
    k = len(fused)
    config = dict(base_config("LORA"), r=o["r"], lora_alpha=o["alpha"], lora_dropout=o["dropout"],
                  target_modules=modules, fan_in_fan_out=True, bias="none", use_rslora=False, use_dora=False,
                  init_lora_weights=True,
                  rank_pattern={"attn.c_attn": k * o["r"]} if k > 1 else {},
                  alpha_pattern={"attn.c_attn": k * o["alpha"]} if k > 1 else {})
    return config, tensors


# --- PEFT -> ours --------------------------------------------------------------------------------
def from_peft(config, tensors, shape, backbone, config_path, weights_path):
    """Imported from a PEFT adapter's settings (adapter_config.json, a dict) and tensors, for a
    GPT-2 of `shape` (BackboneShape); `backbone` (the GPT-2) gives LayerNorms PEFT leaves alone.
    Anything without a counterpart here is a VLMError naming the file and key."""
    peft_type = config.get("peft_type")
    if peft_type not in IMPORT_METHODS:
        raise VLMError(f"{config_path}: peft_type {peft_type!r} has no counterpart here "
                       f"(importable: {', '.join(IMPORT_METHODS)})")
    task_type = config.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise VLMError(f"{config_path}: task_type {task_type!r}: only a causal language model's adapter "
                       f"(CAUSAL_LM) maps onto GPT-2's language model here")
    if config.get("modules_to_save"):
        raise VLMError(f"{config_path}: modules_to_save {config['modules_to_save']!r}: whole trained "
                       f"copies of backbone modules have no counterpart in a task's methods")
    if peft_type == "LORA":
        return lora_from_peft(config, tensors, shape, config_path, weights_path)
    if peft_type == "LN_TUNING":
        return ln_from_peft(tensors, shape, backbone, weights_path)
    return prompt_from_peft(peft_type, config, tensors, shape, config_path, weights_path)


def _number(config, key, default, config_path, kind=int):
    value = config.get(key, default)
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or (kind is float and not math.isfinite(value)):
        raise VLMError(f"{config_path}: {key} must be a number, got {value!r}")
    return value


def _only_key(tensors, key, weights_path, what):
    for name in tensors:
        if name != key:
            raise VLMError(f"{weights_path}: unexpected tensor {name!r} ({what} stores only {key!r})")
    if key not in tensors:
        raise VLMError(f"{weights_path}: missing tensor {key!r}")
    return tensors[key]


def prompt_from_peft(peft_type, config, tensors, shape, config_path, weights_path):
    """PREFIX_TUNING, PROMPT_TUNING and P_TUNING: the stored prompt_embeddings."""
    expected = prompt_shape(shape)
    for key, ours in expected.items():
        if config.get(key) is not None and config[key] != ours:
            raise VLMError(f"{config_path}: {key} is {config[key]!r}, but the backbone's is {ours} "
                           f"(the adapter was trained on another model)")
    n = _number(config, "num_virtual_tokens", None, config_path)
    if n < 1:
        raise VLMError(f"{config_path}: num_virtual_tokens must be at least 1, got {n}")
    table = _only_key(tensors, PROMPT_KEY, weights_path, peft_type)
    width = 2 * shape.n_layer * shape.d_model if peft_type == "PREFIX_TUNING" else shape.d_model
    if tuple(table.shape) != (n, width):
        raise VLMError(f"{weights_path}: {PROMPT_KEY} has shape {tuple(table.shape)}, expected {(n, width)} "
                       f"(num_virtual_tokens {n} on this backbone)")
    if peft_type == "PREFIX_TUNING":
        return Imported("prefix", {"length": n, "reparameterize": False}, {"prefixes": table})
    if peft_type == "P_TUNING":
        return Imported("ptuning", {"length": n, "reparameterize": False}, {"table": table})
    return Imported("prompt", {"length": n}, {"embeddings": table})


def ln_from_peft(tensors, shape, backbone, weights_path):
    norms = {}
    for layer in range(shape.n_layer):
        for name in ("ln_1", "ln_2"):
            norms[f"{layer}_{name}"] = getattr(backbone.transformer.h[layer], name)
    norms["ln_f"] = backbone.transformer.ln_f
    state = {f"norms.{key}.{part}": getattr(norm, part).detach().clone()
             for key, norm in norms.items() for part in ("weight", "bias")}
    for name, tensor in tensors.items():
        match = LN_KEY.fullmatch(name)
        if match is None:
            raise VLMError(f"{weights_path}: tensor {name!r} is no LayerNorm copy of GPT-2's "
                           f"(LN tuning here tunes transformer.h.*.ln_1, ln_2 and transformer.ln_f)")
        layer, norm, final, part = match.groups()
        if layer is not None and int(layer) >= shape.n_layer:
            raise VLMError(f"{weights_path}: tensor {name!r} is of layer {layer}, "
                           f"but the backbone has {shape.n_layer} layers")
        if tuple(tensor.shape) != (shape.d_model,):
            raise VLMError(f"{weights_path}: {name} has shape {tuple(tensor.shape)}, "
                           f"expected {(shape.d_model,)}")
        state[f"norms.{final or f'{layer}_{norm}'}.{part}"] = tensor
    return Imported("ln", {}, state)


def _pattern_value(patterns, module_name, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _check_target_modules(config, shape, config_path):
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        return  # a regex (or PEFT's shorthand): the tensors say what it matched
    names = [f"transformer.h.{i}.{m}" for i in range(shape.n_layer) for m in MODULE_TARGETS]
    for target in targets:
        if not isinstance(target, str) or not any(n == target or n.endswith("." + target) for n in names):
            raise VLMError(f"{config_path}: target_modules: {target!r} is none of GPT-2's projections that "
                           f"our lora adapts ({', '.join(MODULE_TARGETS)})")


def lora_from_peft(config, tensors, shape, config_path, weights_path):
    for key, unused in LORA_UNMAPPED.items():
        value = config.get(key, unused)
        if value not in (unused, None, False, [], {}):
            raise VLMError(f"{config_path}: {key} {value!r} has no counterpart in our lora")
    _check_target_modules(config, shape, config_path)
    dropout = float(_number(config, "lora_dropout", 0.0, config_path, float))
    rslora = bool(config.get("use_rslora", False))
    token_ids = config.get("trainable_token_indices")
    if isinstance(token_ids, dict):
        raise VLMError(f"{config_path}: trainable_token_indices: token rows of named layers; only the input "
                       f"embedding's (a list of token ids) map onto task rows")
    found, token_rows = {}, {}
    for name, tensor in sorted(tensors.items()):
        if name == TOKENS_KEY and token_ids:
            if tuple(tensor.shape) != (len(token_ids), shape.d_model):
                raise VLMError(f"{weights_path}: {name} has shape {tuple(tensor.shape)}, expected "
                               f"{(len(token_ids), shape.d_model)} "
                               f"(trainable_token_indices has {len(token_ids)})")
            token_rows = {int(i): row for i, row in zip(token_ids, tensor)}
            continue
        match = LORA_KEY.fullmatch(name)
        if match is None:
            raise VLMError(f"{weights_path}: tensor {name!r} cannot be mapped: our lora adapts GPT-2's "
                           f"{', '.join(MODULE_TARGETS)} "
                           f"(tensors ...h.<layer>.<module>.lora_A/lora_B.weight)")
        layer, module, side = int(match.group(1)), match.group(2), match.group(3)
        if layer >= shape.n_layer:
            raise VLMError(f"{weights_path}: tensor {name!r} is of layer {layer}, "
                           f"but the backbone has {shape.n_layer} layers")
        found.setdefault((layer, module), {})[side] = (name, tensor)
    if token_ids and not token_rows:
        raise VLMError(f"{weights_path}: missing tensor {TOKENS_KEY!r} (trainable_token_indices is set)")
    if not found:
        raise VLMError(f"{weights_path}: holds no LoRA tensors")
    pieces, scales = {}, {}
    for (layer, module), sides in found.items():
        for side in "AB":
            if side not in sides:
                other = sides["A" if side == "B" else "B"][0]
                raise VLMError(f"{weights_path}: {other} has no lora_{side} beside it")
        (a_name, a), (b_name, b) = sides["A"], sides["B"]
        projection = next(p for p, m in MODULE_OF.items() if m == module)
        in_features, out_features = shape.linear_shape(projection)
        module_name = f"transformer.h.{layer}.{module}"
        rank = _pattern_value(config.get("rank_pattern"), module_name, _number(config, "r", 8, config_path))
        alpha = _pattern_value(config.get("alpha_pattern"), module_name,
                               _number(config, "lora_alpha", 8, config_path, float))
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
            raise VLMError(f"{config_path}: alpha_pattern: the alpha of {module_name} must be a positive "
                           f"number, got {alpha!r}")
        if tuple(a.shape) != (rank, in_features):
            raise VLMError(f"{weights_path}: {a_name} has shape {tuple(a.shape)}, "
                           f"expected {(rank, in_features)} (rank {rank} on this backbone's {module})")
        if tuple(b.shape) != (out_features, rank):
            raise VLMError(f"{weights_path}: {b_name} has shape {tuple(b.shape)}, "
                           f"expected {(out_features, rank)}")
        scales[(layer, module)] = alpha / (math.sqrt(rank) if rslora else rank)
        for target in MODULE_TARGETS[module]:
            part = TARGETS[target][1]
            block = b if part is None else b[part * shape.d_model:(part + 1) * shape.d_model]
            pieces[(layer, target)] = (a, block, (block != 0).any(dim=0).nonzero().flatten())
    used = {target for (_, target), (_, _, components) in pieces.items() if len(components)}
    if not used:  # an untrained adapter (every B zero): every target of its modules, at full rank
        used = {target for (_, target) in pieces}
        pieces = {key: (a, b, torch.arange(a.shape[0])) for key, (a, b, _) in pieces.items()}
    targets = [t for t in TARGETS if t in used]
    rank = max(max(len(components) for _, _, components in pieces.values()), 1)
    scale = scales[min(scales)]
    state = {}
    for layer in range(shape.n_layer):
        for target in targets:
            projection, part = TARGETS[target]
            in_features, out_features = shape.linear_shape(projection)
            out_features = shape.d_model if part is not None else out_features
            a, b = torch.zeros(rank, in_features), torch.zeros(out_features, rank)
            if (layer, target) in pieces:
                a_full, block, components = pieces[(layer, target)]
                k = len(components)
                a[:k] = a_full[components]
                ratio = scales[(layer, MODULE_OF[projection])] / scale
                b[:, :k] = block[:, components] * ratio if ratio != 1 else block[:, components]
            state[f"pairs.{layer}_{target}.A"], state[f"pairs.{layer}_{target}.B"] = a, b
    options = {"r": rank, "alpha": float(scale * rank), "dropout": dropout, "targets": targets}
    return Imported("lora", options, state, token_rows)
