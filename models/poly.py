"""`poly`: Polytropon (Ponti et al. 2022, `splits` 1) and multi-head routing, MHR (Caccia et al.
2022, `splits` H), computed as HF PEFT's poly tuner computes them (peft/tuners/poly/layer.py,
router.py): a cross-task method. Every task shares one inventory of LoRA skills per adapted
projection; each task owns router logits that pick, for each of `splits` heads, a mixture of them.

For a projection in -> out, with in and out cut into S = splits equal chunks (PEFT's layout):

    A[q, k]: (in/S, r)   B[q, k]: (r, out/S)                    skill k, split q (shared)
    z_t: (S, K)                                                  task t's router logits (its own)
    w[q] = u[q] / (sum_k u[q, k] + 1e-12),  u = sigmoid(z_t) (eval) or a RelaxedBernoulli(1, z_t)
           sample drawn per row and projection (training)
    A_t = [sum_k w[0,k] A[0,k]; ...; sum_k w[S-1,k] A[S-1,k]]    (in, r): splits stacked along in
    B_t = [sum_k w[0,k] B[0,k], ..., sum_k w[S-1,k] B[S-1,k]]    (r, out): splits side by side
    out <- out + x A_t B_t / r

However the heads split A and B, A_t and B_t are one rank-r pair: a task's mixture is exactly an
ordinary LoRA (models/methods/lora.py) with A = A_t^T, B = B_t^T, alpha 1 (scale 1/r), no dropout.
So a poly task is saved, combined, evaluated and served as a `lora` task, and only training knows
the inventory: each poly task's module in the model is a PolyTask, a LoRA whose pairs are
generated from the inventory and the task's router on every forward (eval mode: the exported
pairs themselves, through LoRA's own code, so the export is exact), whose state_dict is that
exported LoRA and whose only parameter is its router. The inventory is one module of the model
(`model.poly_inventory`); the engines (engines/poly.py) train it, save it beside each checkpoint
(poly_inventory.safetensors / .json) and read it back for --resume and --poly_inventory.
"""
import math
import os

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from models.checkpoint import check_tensor_shapes, load_tensors, save_safetensors
from models.methods.base import Method
from models.methods.lora import TARGETS, LoRAMethod, _add_columns
from utils.data import read_json_file
from utils.errors import VLMError
from utils.io import write_json

EPS = 1e-12  # PEFT's PolyRouter: weights = u / (sum u + EPS)
INVENTORY_CONFIG = "poly_inventory.json"
INVENTORY_WEIGHTS = "poly_inventory.safetensors"
INVENTORY_FORMAT = "vlm-poly-inventory"
STRUCTURE = ("skills", "r", "splits", "targets")  # what the inventory's tensor shapes depend on


class Poly:
    """The method's declaration (not a per-task Method: it is not in the registry of
    models/methods/, and tasks are saved as `lora`): options with the papers' defaults, checks,
    the parameter count, and the LoRA form a task is saved in."""
    name = "poly"
    title = "Polytropon / multi-head routing: a shared inventory of LoRA skills, routed per task"
    reference = "Ponti et al. 2022; Caccia et al. 2022"
    defaults = {"skills": 4, "r": 8, "splits": 1, "router_lr": 0.1, "targets": ["q", "v"]}
    help = {"skills": "LoRA skills in the shared inventory (per adapted projection)",
            "r": "rank of every skill",
            "splits": "routing heads: 1 is Polytropon, H > 1 multi-head routing (MHR)",
            "router_lr": "the routers' own peak learning rate (mttl's module_logits_learning_rate)",
            "targets": f"projections to adapt, comma-separated: {', '.join(TARGETS)}"}
    resolve = classmethod(Method.resolve.__func__)  # the registry's option checks, with these defaults
    require = staticmethod(Method.require)

    @classmethod
    def check(cls, options, where):
        for key in ("skills", "r", "splits"):
            cls.require(options[key] >= 1, where, f"{key} must be at least 1, got {options[key]}")
        cls.require(options["router_lr"] > 0, where,
                    f"router_lr must be positive, got {options['router_lr']}")
        LoRAMethod.check(dict(LoRAMethod.defaults, targets=options["targets"]), where)

    @staticmethod
    def check_shape(shape, options, where="--poly_splits"):
        """Every adapted projection's input and output must cut into `splits` equal heads."""
        for _, in_features, out_features in pair_shapes(shape, options["targets"]):
            if in_features % options["splits"] or out_features % options["splits"]:
                raise VLMError(f"{where} {options['splits']}: does not divide the {in_features} -> "
                               f"{out_features} projection of this backbone into equal heads")

    @staticmethod
    def parameter_count(shape, options, n_tasks):
        """Per adapted projection (in -> out): skills x r x (in + out) inventory parameters plus
        tasks x splits x skills router logits."""
        total = 0
        for _, in_features, out_features in pair_shapes(shape, options["targets"]):
            total += options["skills"] * options["r"] * (in_features + out_features)
            total += n_tasks * options["splits"] * options["skills"]
        return total

    @staticmethod
    def lora_options(options):
        """The options of the `lora` every poly task is saved as (PEFT scales by 1 / r, no dropout)."""
        return {"r": options["r"], "alpha": 1.0, "dropout": 0.0, "targets": list(options["targets"])}


def pair_shapes(shape, targets):
    """[(key, in, out)] of every adapted (layer, target), keys as LoRA's pairs (`<layer>_<target>`),
    layers outer and targets in the given order; q, k and v are their own d-wide part of c_attn."""
    found = []
    for layer in range(shape.n_layer):
        for target in targets:
            projection, part = TARGETS[target]
            in_features, out_features = shape.linear_shape(projection)
            out_features = shape.d_model if part is not None else out_features
            found.append((f"{layer}_{target}", in_features, out_features))
    return found


def routing_weights(logits):
    """Mixing weights (..., S, K) from router logits: sigmoid, normalized per head (PEFT's eval)."""
    u = torch.sigmoid(logits)
    return u / (u.sum(dim=-1, keepdim=True) + EPS)


def sampled_weights(logits):
    """PEFT's training weights: a relaxed Bernoulli (temperature 1) sample, normalized per head."""
    u = RelaxedBernoulli(temperature=1.0, logits=logits).rsample()
    return u / (u.sum(dim=-1, keepdim=True) + EPS)


class SkillInventory(nn.Module):
    """The shared skills: A[key] (S, K, in/S, r) and B[key] (S, K, r, out/S) for every adapted
    (layer, target) key, PEFT's poly_lora_A / poly_lora_B, initialized as PEFT does: each A[q, k]
    the transpose of an nn.Linear-style (r, in/S) draw, B zero."""

    def __init__(self, shape, options):
        super().__init__()
        self.options = {key: options[key] for key in STRUCTURE}
        S, K, r = options["splits"], options["skills"], options["r"]
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for key, in_features, out_features in pair_shapes(shape, options["targets"]):
            self.A[key] = nn.Parameter(torch.empty(S, K, in_features // S, r))
            self.B[key] = nn.Parameter(torch.zeros(S, K, r, out_features // S))
            if self.A[key].device.type != "meta":
                with torch.no_grad():
                    for k in range(K):  # PEFT's loop order, so the same seed gives the same skills
                        for q in range(S):
                            draw = torch.empty(r, in_features // S)
                            nn.init.kaiming_uniform_(draw, a=math.sqrt(5))
                            self.A[key][q, k] = draw.t()

    def keys(self):
        return list(self.A)

    def mixture(self, key, weights):
        """One task's LoRA pair for weights (S, K): (A (r, in), B (out, r)), LoRA's layout."""
        return mix(self.A[key], self.B[key], weights)

    def row_mixtures(self, key, weights):
        """Every row's pair for weights (n, S, K), as PEFT's forward builds them:
        A (n, in, r), B (n, r, out)."""
        n, r = weights.shape[0], self.A[key].shape[-1]
        a = torch.einsum("bqs,qsdr->bqdr", weights, self.A[key]).reshape(n, -1, r)
        b = torch.einsum("bqs,qsrd->bqrd", weights, self.B[key]).transpose(1, 2).reshape(n, r, -1)
        return a, b


def mix(A, B, weights):
    """The LoRA pair (A (r, in), B (out, r), contiguous) of skills A (S, K, in/S, r), B (S, K, r, out/S)
    mixed with weights (S, K): splits stacked along in for A, side by side along out for B."""
    r = A.shape[-1]
    a = torch.einsum("qs,qsdr->qdr", weights, A).reshape(-1, r)                  # (in, r)
    b = torch.einsum("qs,qsrd->qrd", weights, B).transpose(0, 1).reshape(r, -1)  # (r, out)
    return a.t().contiguous(), b.t().contiguous()


class _Pair:
    """A generated LoRA pair: what LoRAMethod's code reads of a LowRankPair (A, B)."""

    def __init__(self, A, B):
        self.A, self.B = A, B


class PolyTask(LoRAMethod):
    """One task's Poly/MHR module: a `lora` (its options are the saved LoRA's) whose pairs come from
    the shared inventory and this task's router (n_pairs, S, K), its one parameter."""

    def __init__(self, shape, poly_options, inventory):
        Method.__init__(self, shape, Poly.lora_options(poly_options))  # no LowRankPair tensors
        keys = [key for key, _, _ in pair_shapes(shape, poly_options["targets"])]
        self.pair_index = {key: i for i, key in enumerate(keys)}
        self.router = nn.Parameter(torch.empty(len(keys), poly_options["splits"], poly_options["skills"]))
        if self.router.device.type != "meta":
            nn.init.uniform_(self.router, -1e-3, 1e-3)  # PEFT's PolyRouter.reset
        self.drop = nn.Dropout(0.0)
        self.scale = 1.0 / poly_options["r"]
        object.__setattr__(self, "inventory", inventory)  # shared: not a submodule of every task

    def pair(self, key):
        """This task's LoRA pair for `key` with its eval-mode routing: (A (r, in), B (out, r))."""
        return self.inventory.mixture(key, routing_weights(self.router[self.pair_index[key]]))

    def slices(self, layer, name, width):
        return [(_Pair(*self.pair(key)), lo, hi) for key, lo, hi in self.slice_keys(layer, name, width)]

    def linear(self, layer, name, x, out):
        if self.training:
            return _sampled_update(layer, name, x, out, [(self, None)])
        return super().linear(layer, name, x, out)

    @classmethod
    def apply_batched_linear(cls, layer, name, x, out, entries, routing):
        if entries[0][0].training:
            return _sampled_update(layer, name, x, out, entries)
        return super().apply_batched_linear(layer, name, x, out, entries, routing)

    # --- what a checkpoint sees: the exported LoRA -------------------------------------------
    def exported(self):
        with torch.device("meta"):
            lora = LoRAMethod(self.shape, self.options)
        lora = lora.to_empty(device=self.router.device).to(self.router.dtype)
        with torch.no_grad():
            for key, pair in lora.pairs.items():
                A, B = self.pair(key)
                pair.A.copy_(A)
                pair.B.copy_(B)
        return lora.train(self.training)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        with torch.no_grad():  # the exported LoRA's tensors; the router is saved with the inventory
            for key in self.pair_index:
                destination[f"{prefix}pairs.{key}.A"], destination[f"{prefix}pairs.{key}.B"] = self.pair(key)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """The saved LoRA pairs are derived (--resume restores the inventory and the routers from
        poly_inventory.safetensors): nothing to load."""


def _sampled_update(layer, name, x, out, entries):
    """Training: each row's own relaxed-Bernoulli routing for each adapted part of this projection,
    then PEFT's x A_row B_row / r. entries: [(PolyTask, rows or None)] (one inventory for all);
    the rows draw their samples in batch order, as PEFT's router does for a batch."""
    first = entries[0][0]
    if entries[0][1] is None:
        index, xs = None, x
        which = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    else:
        index = torch.cat([rows for _, rows in entries])
        which = torch.cat([torch.full((len(rows),), i, dtype=torch.long, device=rows.device)
                           for i, (_, rows) in enumerate(entries)])
        order = index.argsort()
        index, which = index[order], which[order]
        xs = x.index_select(0, index)
    for key, lo, hi in sorted(first.slice_keys(layer, name, out.shape[-1]), key=lambda k: k[1]):
        logits = torch.stack([task.router[task.pair_index[key]] for task, _ in entries])[which]  # (n, S, K)
        a, b = first.inventory.row_mixtures(key, sampled_weights(logits))
        delta = xs.bmm(a.to(x.dtype)).bmm(b.to(x.dtype)) * first.scale                        # (n, T, hi-lo)
        if index is not None:
            delta = x.new_zeros(x.shape[0], x.shape[1], hi - lo).index_copy(0, index, delta)
        out = _add_columns(out, delta, lo, hi)
    return out


# --- the model side of a run ----------------------------------------------------------------------
def install(model, tasks, options, skills=None):
    """Give `tasks` (lora placeholders in `model`, Poly.lora_options) their PolyTask modules over one
    new inventory (`skills`: tensors to start from, an inventory file's); returns (inventory,
    {task: PolyTask}). The inventory becomes `model.poly_inventory`."""
    Poly.check_shape(model.shape, options)
    inventory = SkillInventory(model.shape, options)
    if skills is not None:
        with torch.no_grad():
            for key in inventory.keys():
                inventory.A[key].copy_(skills[f"skills.{key}.A"])
                inventory.B[key].copy_(skills[f"skills.{key}.B"])
    device, dtype = model.gpt2.device, model.gpt2.dtype
    model.poly_inventory = inventory.to(device=device, dtype=dtype)
    views = {}
    for task in tasks:
        views[task] = PolyTask(model.shape, options, inventory).train(model.training)
        model.replace_method(task, "lora", views[task])
    return inventory, views


def set_average(model, tasks, skills, options):
    """MHR-mu: each task's `lora` starts from the inventory's average skill (the mixture with equal
    weights), then trains as a plain LoRA. skills: an inventory file's tensors of these options."""
    Poly.check_shape(model.shape, options)
    S, K = options["splits"], options["skills"]
    with torch.no_grad():
        for task in tasks:
            for key, pair in model.tasks[task].methods["lora"].pairs.items():
                A, B = skills[f"skills.{key}.A"], skills[f"skills.{key}.B"]
                average = mix(A, B, torch.full((S, K), 1.0 / K, dtype=A.dtype))
                pair.A.copy_(average[0])
                pair.B.copy_(average[1])


# --- the inventory's files ---------------------------------------------------------------------
def inventory_tensors(inventory, views):
    tensors = {}
    for key in inventory.keys():
        tensors[f"skills.{key}.A"], tensors[f"skills.{key}.B"] = inventory.A[key], inventory.B[key]
    tensors.update({f"router.{task}": view.router for task, view in views.items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_inventory(path, inventory, views, fingerprint, base_model):
    """poly_inventory.safetensors (skills, and every task's router) and .json (structure, tasks,
    backbone) in folder `path`; the JSON last."""
    save_safetensors(os.path.join(path, INVENTORY_WEIGHTS), inventory_tensors(inventory, views),
                     {"format": "pt"})
    write_json(os.path.join(path, INVENTORY_CONFIG),
               {"format": INVENTORY_FORMAT, "version": 1, "options": dict(inventory.options),
                "tasks": list(views), "base_model": base_model, "base_fingerprint": fingerprint})


def read_inventory_config(path, where):
    """The structure options, tasks and backbone fingerprint of an inventory folder (`where` names
    it in errors, e.g. '--poly_inventory runs/x')."""
    file = os.path.join(path, INVENTORY_CONFIG)
    if not os.path.isdir(path):
        raise VLMError(f"{where}: no such folder")
    if not os.path.isfile(file):
        raise VLMError(f"{where}: no {INVENTORY_CONFIG} "
                       "(not a run of --method poly or one of its checkpoints)")
    config, _ = read_json_file(file, "poly inventory")
    if not isinstance(config, dict) or config.get("format") != INVENTORY_FORMAT:
        raise VLMError(f"{file}: not a {INVENTORY_FORMAT} file")
    options = config.get("options")
    if not isinstance(options, dict) or set(options) != set(STRUCTURE):
        raise VLMError(f"{file}: 'options' must give {', '.join(STRUCTURE)}")
    tasks = config.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise VLMError(f"{file}: 'tasks' must be a list of task names")
    if not isinstance(config.get("base_fingerprint"), str):
        raise VLMError(f"{file}: 'base_fingerprint' is missing")
    config["options"] = {k: v for k, v in Poly.resolve(options, file).items() if k in STRUCTURE}
    return config


def expected_inventory(shape, options, tasks):
    """{tensor: shape} of an inventory file of these options holding these tasks' routers."""
    S, K, r = options["splits"], options["skills"], options["r"]
    pairs = pair_shapes(shape, options["targets"])
    expected = {f"router.{task}": (len(pairs), S, K) for task in tasks}
    for key, in_features, out_features in pairs:
        expected[f"skills.{key}.A"] = (S, K, in_features // S, r)
        expected[f"skills.{key}.B"] = (S, K, r, out_features // S)
    return expected


def read_inventory(path, shape, fingerprint, where, tasks=None):
    """(config, tensors) of an inventory folder made on this backbone. tasks: the routers that must
    be there (--resume); None: the skills only are needed (a new task's run), routers may be any."""
    config = read_inventory_config(path, where)
    if config["base_fingerprint"] != fingerprint:
        raise VLMError(f"{where}: the inventory was trained on another backbone (fingerprint "
                       f"{config['base_fingerprint'][:12]}, this one {fingerprint[:12]})")
    file = os.path.join(path, INVENTORY_WEIGHTS)
    tensors = load_tensors(file)
    routers = tasks if tasks is not None else [k[len("router."):] for k in tensors if k.startswith("router.")]
    expected = expected_inventory(shape, config["options"], routers)
    check_tensor_shapes(tensors, expected, file, "not a tensor of this inventory")
    return config, tensors


def load_state(path, inventory, views, shape, fingerprint):
    """--resume: the inventory and every task's router from a checkpoint folder."""
    _, tensors = read_inventory(path, shape, fingerprint, path, tasks=list(views))
    with torch.no_grad():
        for key in inventory.keys():
            inventory.A[key].copy_(tensors[f"skills.{key}.A"])
            inventory.B[key].copy_(tensors[f"skills.{key}.B"])
        for task, view in views.items():
            view.router.copy_(tensors[f"router.{task}"])
