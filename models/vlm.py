"""Versatile Language Model: one GPT-2 from Hugging Face transformers, untouched, plus per-task
modules: each task owns its special-token rows (task embeddings) and any parameter-efficient
methods of models/methods/ (the authors' residual adapter, LoRA, prefixes, prompts, ...).

The task is chosen per row: `task_ids` (batch,) holds a task id or -1 (plain GPT-2), so one
forward pass serves rows of different tasks and different methods. Methods act through hooks on
the backbone's modules, reading the forward's one Routing object (models/routing.py); the
backbone's modules, parameter names and KV cache stay exactly Hugging Face's. With every id -1
the logits equal GPT-2's exactly.

Inputs beyond GPT-2's own:
    token_type_ids (batch, seq): segment ids, embedded by the token table as GPT-2 does; -1: none
    virtual_ids (batch, seq): k at the k-th virtual token of the row's task (prompt, ptuning), else -1
The model knows nothing of what the tasks are: the engines give it TaskSpecs (name, id, rows,
methods) and build the inputs.
"""
import hashlib
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging as hf_logging

from models.memory import set_training_attention, use_lean_gelu
from models.methods import BackboneShape, method_class
from models.routing import PrefixCache, Routing, apply_by_rows
from models.sparsity import copy_masks, pruned_count
from models.task_rows import TaskRows
from utils.errors import VLMError
from utils.hub import require_hub
from utils.vocab import GPT2_VOCAB_SIZE, SPECIAL_IDS, VOCAB_SIZE

hf_logging.disable_progress_bar()  # our scripts show their own progress; keep stderr for errors
IGNORE_INDEX = -100
NO_SEGMENT = -1
LOSS_CHUNK = 256  # labelled positions per chunk of the training loss: (256, 50,287) logits at a time
TASK_ROW_SEED = 20200408  # fixed, so every run over one backbone starts from the same new rows


# --- the backbone ----------------------------------------------------------------------------------
def load_backbone(name_or_path, random_init=False, dtype=None):
    """GPT-2 LM (any size, hub name or local folder) with the 30 special-token rows added."""
    try:
        if random_init:
            gpt2 = GPT2LMHeadModel(from_pretrained(GPT2Config, name_or_path))
        else:
            gpt2 = from_pretrained(GPT2LMHeadModel, name_or_path, dtype=dtype)
    except SafetensorError as error:  # a damaged model.safetensors in a Hugging Face folder
        weights = os.path.join(name_or_path, "model.safetensors")
        where = weights if os.path.isfile(weights) else f"--model_checkpoint {name_or_path}"
        raise VLMError(f"{where}: corrupted or truncated safetensors file ({_first_line(error)})") from None
    except (OSError, ValueError) as error:
        raise VLMError(f"--model_checkpoint {name_or_path}: "
                       f"cannot load a GPT-2 model ({_first_line(error)})") from None
    if not random_init:
        weights = os.path.join(name_or_path, "model.safetensors")
        where = weights if os.path.isfile(weights) else f"--model_checkpoint {name_or_path}"
        check_finite(gpt2.state_dict(), where)
    add_special_token_rows(gpt2)
    return gpt2


def check_finite(tensors, where):
    """One VLMError naming the first floating-point tensor that holds NaN or Inf: weights so damaged
    would otherwise surface as a traceback deep in decoding (torch.multinomial) or as NaN scores."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise VLMError(f"{where}: tensor {name!r} holds {bad:,} NaN or infinite value"
                           f"{'' if bad == 1 else 's'}; the weights are damaged")


def from_pretrained(cls, name_or_path, **kwargs):
    """cls.from_pretrained(name_or_path) that never waits on an unreachable hub: a local folder as
    it is; a hub name from the local Hugging Face cache if it is there, else from the hub if it
    answers (utils/hub.py), else one VLMError that says how to get the weights."""
    if os.path.isdir(name_or_path):
        return cls.from_pretrained(name_or_path, **kwargs)
    try:
        return cls.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except OSError:
        pass  # not in the local cache
    require_hub(name_or_path)
    return cls.from_pretrained(name_or_path, **kwargs)


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def add_special_token_rows(gpt2):
    """Grow the (tied) token embedding from 50,257 to 50,287 rows.

    New rows are drawn from N(0, initializer_range) with a fixed seed, as GPT-2's own init does,
    but independent of the run's seed: every task trained on one backbone starts from the same
    rows and trains only its own, so task checkpoints combine without conflicts."""
    rows = gpt2.get_input_embeddings().weight.shape[0]
    if rows == VOCAB_SIZE:
        return
    if rows != GPT2_VOCAB_SIZE:
        raise VLMError(f"backbone has a vocabulary of {rows} tokens; expected GPT-2's {GPT2_VOCAB_SIZE} "
                       f"(or {VOCAB_SIZE} with the special tokens)")
    gpt2.resize_token_embeddings(VOCAB_SIZE, mean_resizing=False)
    weight = gpt2.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(TASK_ROW_SEED)
    new_rows = torch.randn(VOCAB_SIZE - GPT2_VOCAB_SIZE, weight.shape[1], generator=generator)
    with torch.no_grad():
        weight[GPT2_VOCAB_SIZE:] = (new_rows * gpt2.config.initializer_range).to(weight)


def backbone_fingerprint(gpt2):
    """sha256 over the backbone's weights (names, shapes, bytes), the 50,257 original rows only.

    Task checkpoints record it, so they are never loaded onto another backbone."""
    digest = hashlib.sha256()
    wte = gpt2.get_input_embeddings().weight
    for name, tensor in sorted(gpt2.state_dict().items()):
        if name == "lm_head.weight":  # tied to wte
            continue
        if tensor.data_ptr() == wte.data_ptr():
            tensor = tensor[:GPT2_VOCAB_SIZE]
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# --- tasks -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """What the model needs to know of a task: its name, the id rows are routed by, the token-table
    rows it owns (its special tokens; none for user tasks) and its methods with their options."""
    name: str
    task_id: int
    token_ids: tuple = ()
    methods: dict = field(default_factory=dict)  # method name -> options, in the order they apply


class TaskModule(nn.Module):
    """One task's modules inside the model: `methods` (ModuleDict, application order)."""

    def __init__(self, spec, methods):
        super().__init__()
        self.name, self.task_id, self.token_ids = spec.name, spec.task_id, tuple(spec.token_ids)
        self.methods = nn.ModuleDict(methods)
        virtual = [m for m in self.methods.values() if m.adds_virtual_tokens()]
        prefix = [m for m in self.methods.values() if m.adds_prefix()]
        if len(virtual) > 1 or len(prefix) > 1:
            kind = "virtual tokens" if len(virtual) > 1 else "prefixes"
            raise VLMError(f"task {self.name}: methods {' and '.join(m.name for m in virtual or prefix)} "
                           f"both add {kind}; combine at most one of them")
        self.virtual = virtual[0] if virtual else None

    @property
    def num_virtual_tokens(self):
        return self.virtual.num_virtual_tokens if self.virtual is not None else 0

    def spec(self):
        return TaskSpec(self.name, self.task_id, self.token_ids,
                        {name: dict(m.options) for name, m in self.methods.items()})


class VersatileLM(nn.Module):
    def __init__(self, gpt2, tasks=()):
        super().__init__()
        self.gpt2 = gpt2
        self.shape = BackboneShape.of(gpt2.config)
        self.tasks = nn.ModuleDict()     # task name -> TaskModule
        self._routing = None             # set for the duration of one forward pass
        self._segments = None            # token_type_ids of the forward pass (see _add_segments)
        self._prefix_width = 0           # prefix columns of the forward pass's cache
        self.task_rows = None            # TaskRows while module/emb_only training is set up
        self._hooks = {}                 # (point, layer, name) -> hook handle
        use_lean_gelu(gpt2)              # same values, less training memory (models/memory.py)
        self.register_state_dict_post_hook(_drop_task_rows)  # views of wte: saved with the table
        gpt2.transformer.drop.register_forward_pre_hook(self._add_segments)
        for spec in tasks:
            self.add_task(spec)

    def train(self, mode=True):
        # attention recomputed in backward in training; our attention function also where prefixes are gated
        set_training_attention(self.gpt2, mode, gated=self._gated_prefixes())
        return super().train(mode)

    def _gated_prefixes(self):
        return any("prefix_gate" in m.points for t in self.tasks.values() for m in t.methods.values())

    @classmethod
    def from_pretrained(cls, name_or_path, tasks=(), random_init=False):
        return cls(load_backbone(name_or_path, random_init), tasks)

    @property
    def config(self):
        return self.gpt2.config

    @property
    def device(self):
        return self.gpt2.device

    # --- the task registry -------------------------------------------------------------------
    def add_task(self, spec):
        """Add a task's (freshly initialized) modules; returns its TaskModule."""
        return self.attach_task(self.build_task(spec))

    def build_task(self, spec):
        """A task's freshly initialized TaskModule for this backbone, not yet in the model (a server
        fills it from a checkpoint while the model keeps decoding, then attaches it)."""
        methods = {name: method_class(name)(self.shape, options, self.gpt2)
                   for name, options in spec.methods.items()}
        return TaskModule(spec, methods).to(device=self.gpt2.device, dtype=self.gpt2.dtype)

    def attach_task(self, module):
        """Put a built TaskModule in the model (its name, id and rows must be free); returns it."""
        if module.name in self.tasks:
            raise VLMError(f"task {module.name} is already in the model")
        if module.task_id in self.tasks_by_id() or module.task_id < 0:
            raise VLMError(f"task {module.name}: id {module.task_id} is negative or taken")
        taken = {i for t in self.tasks.values() for i in t.token_ids}
        if taken & set(module.token_ids) or not set(module.token_ids) <= set(SPECIAL_IDS):
            raise VLMError(f"task {module.name}: token rows {list(module.token_ids)} overlap another task's "
                           f"or are not among the added special tokens")
        self.tasks[module.name] = module
        self._refresh_hooks()
        return module

    def remove_task(self, name):
        del self.tasks[name]
        self._refresh_hooks()

    def replace_method(self, task, name, method):
        """Put an already-built method module (e.g. its exported form) in a task's place of `name`."""
        self.tasks[task].methods[name] = method.to(device=self.gpt2.device, dtype=self.gpt2.dtype)
        self._refresh_hooks()

    def tasks_by_id(self):
        return {t.task_id: t for t in self.tasks.values()}

    def task_id(self, name):
        """The id rows of task `name` are routed by; -1 (plain GPT-2) for a task the model lacks."""
        return self.tasks[name].task_id if name in self.tasks else -1

    def next_task_id(self, first=0):
        taken = set(self.tasks_by_id())
        i = first
        while i in taken:
            i += 1
        return i

    # --- hooks: installed only where some task's methods act ----------------------------------
    def _modules_at(self, point, layer, name=None):
        blocks = self.gpt2.transformer.h
        if point == "block_output":
            return blocks[layer]
        if point in ("attn_output", "prefix_gate"):
            return blocks[layer].attn
        if point == "mlp_output":
            return blocks[layer].mlp
        if point == "linear":
            owner, _, attr = name.partition(".")
            return (getattr(blocks[layer].attn, name) if not attr
                    else getattr(getattr(blocks[layer], owner), attr))
        if point == "layer_norm":
            return self.gpt2.transformer.ln_f if layer == -1 else getattr(blocks[layer], name)
        raise ValueError(point)

    def _needed_hooks(self):
        needed = set()
        layers = range(self.shape.n_layer)
        for task in self.tasks.values():
            for method in task.methods.values():
                for point in method.points & {"block_output", "attn_output", "mlp_output", "prefix_gate"}:
                    needed.update((point, i, None) for i in layers)
                if "layer_norm" in method.points:
                    needed.update(("layer_norm", i, n) for i in layers for n in ("ln_1", "ln_2"))
                    needed.add(("layer_norm", -1, "ln_f"))
                needed.update(("linear", i, n) for i, n in method.linear_targets())
        return needed

    def _refresh_hooks(self):
        needed = self._needed_hooks()
        for key in [k for k in self._hooks if k not in needed]:
            self._hooks.pop(key).remove()
        for key in sorted(needed - set(self._hooks), key=str):
            point, layer, name = key
            module = self._modules_at(point, layer, name)
            if point == "prefix_gate":
                self._hooks[key] = module.register_forward_pre_hook(self._make_gate_hook(layer))
            else:
                self._hooks[key] = module.register_forward_hook(self._make_hook(point, layer, name))
        set_training_attention(self.gpt2, self.training, gated=self._gated_prefixes())

    def _make_gate_hook(self, layer):
        """Before attention: each gated-prefix task's gates (n, T) from the attention's input, left on
        the attention module for models/memory.py's attention function to apply."""
        def hook(module, args):
            routing = self._routing
            entries = routing.entries("prefix_gate") if routing is not None else ()
            module.vlm_prefix_gates = [(rows, m.prefix_gate(layer, _rows(args[0], rows)), self._prefix_width)
                                       for m, rows in entries] or None
            return None
        return hook

    def _clear_gates(self):
        if self._gated_prefixes():
            for block in self.gpt2.transformer.h:
                block.attn.vlm_prefix_gates = None

    def _make_hook(self, point, layer, name):
        def hook(module, args, output):
            routing = self._routing
            if routing is None:
                return output
            x = args[0] if args else None
            if point == "linear":
                return self._apply_linear(layer, name, x, output, routing)
            entries = routing.entries(point)
            if not entries:
                return output
            if point == "attn_output":  # GPT2Attention returns (output, attention weights)
                out = apply_by_rows(entries, output[0],
                                    lambda m, o, rows: m.attn_output(layer, _rows(x, rows), o))
                return (out,) + tuple(output[1:])
            if point == "mlp_output":
                return apply_by_rows(entries, output,
                                     lambda m, o, rows: m.mlp_output(layer, _rows(x, rows), o))
            if point == "block_output":
                return apply_by_rows(entries, output, lambda m, o, rows: m.block_output(layer, o))
            if point == "layer_norm":
                return apply_by_rows(entries, output,
                                     lambda m, o, rows: m.layer_norm(layer, name, _rows(x, rows)))
            raise ValueError(point)
        return hook

    @staticmethod
    def _apply_linear(layer, name, x, out, routing):
        entries = routing.linear_entries(layer, name)
        if not entries:
            return out
        batched, single = {}, []
        for method, rows in entries:
            if rows is not None and type(method).batched_linear:
                batched.setdefault(type(method), []).append((method, rows))
            else:
                single.append((method, rows))
        out = apply_by_rows(single, out, lambda m, o, rows: m.linear(layer, name, _rows(x, rows), o))
        for cls, group in batched.items():  # several tasks' rows of one method: one batched update
            out = cls.apply_batched_linear(layer, name, x, out, group, routing)
        return out

    def _add_segments(self, module, args):
        """Segment embeddings, added where GPT-2 adds them (after the position embeddings, before
        the embedding dropout) and in the same order, so the sum is bit-identical to GPT-2's; a
        position with segment -1 (virtual tokens, user tasks) gets none."""
        segments = self._segments
        if segments is None:
            return None
        hidden = args[0]
        embedded = self.gpt2.transformer.wte(segments.clamp(min=0))
        if (segments < 0).any():
            embedded = embedded.masked_fill((segments < 0)[..., None], 0.0)
        return (hidden + embedded,)

    # --- forward ------------------------------------------------------------------------------
    def _prepare(self, input_ids, token_type_ids, task_ids, attention_mask, position_ids, cache, virtual_ids):
        """Keyword arguments for GPT-2 with this forward's routing, virtual tokens, segments and prefixes."""
        batch, length = input_ids.shape
        self._routing = None if task_ids is None else Routing(self, task_ids, batch, input_ids.device)
        routing = self._routing
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids, "cache": cache}
        if virtual_ids is not None and bool((virtual_ids >= 0).any()):
            kwargs["inputs_embeds"] = self._embed_with_virtual_tokens(input_ids, virtual_ids, routing)
        else:
            kwargs["input_ids"] = input_ids
        self._segments = token_type_ids
        prefix_entries = routing.entries("prefix") if routing is not None else ()
        if prefix_entries or isinstance(cache, PrefixCache):
            kwargs.update(self._with_prefixes(prefix_entries, batch, length, attention_mask, position_ids,
                                              cache))
        return kwargs

    def _embed_with_virtual_tokens(self, input_ids, virtual_ids, routing):
        embeds = self.gpt2.transformer.wte(input_ids)                     # (batch, seq, d)
        covered = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for method, rows in routing.entries("virtual") if routing is not None else ():
            table = method.virtual_tokens()                                # (n, d)
            ids = virtual_ids if rows is None else virtual_ids.index_select(0, rows)
            if int(ids.max()) >= len(table):
                raise VLMError(f"virtual token {int(ids.max())} for a {method.name} of {len(table)} tokens")
            own = embeds if rows is None else embeds.index_select(0, rows)
            new = torch.where((ids >= 0)[..., None], table[ids.clamp(min=0)].to(own.dtype), own)
            embeds = new if rows is None else embeds.index_copy(0, rows, new)
            covered[slice(None) if rows is None else rows] = True
        stray = (virtual_ids >= 0).any(dim=1) & ~covered
        if bool(stray.any()):
            row = int(stray.nonzero()[0])
            raise VLMError(f"row {row} has virtual-token positions "
                           "but its task has no prompt or p-tuning method")
        return embeds

    def _with_prefixes(self, entries, batch, length, attention_mask, position_ids, cache):
        """A PrefixCache holding every row's prefix (left-padded to the longest), the attention mask
        over it, and positions shifted by each row's prefix length."""
        device = self.gpt2.device
        if not isinstance(cache, PrefixCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise VLMError("a prefix task cannot continue a cache built without its prefix")
            cache = self._prefix_cache(entries, batch, device)
        past = cache.real_length()
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=device)
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=device)[None].expand(batch, length)
        self._prefix_width = cache.prefix_width
        return {"cache": cache,
                "attention_mask": torch.cat([cache.prefix_mask.to(attention_mask.dtype), attention_mask],
                                            dim=1),
                "position_ids": position_ids + cache.prefix_lengths[:, None]}

    def _prefix_cache(self, entries, batch, device):
        width = max(m.prefix_length for m, _ in entries)
        s = self.shape
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else self.gpt2.dtype)
        mask = torch.zeros(batch, width, dtype=torch.long, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        keys = [torch.zeros(batch, s.n_head, width, s.head_dim, dtype=dtype, device=device)
                for _ in range(s.n_layer)]
        values = [k.clone() for k in keys]
        for method, rows in entries:
            P = method.prefix_length
            where = slice(None) if rows is None else rows
            mask[where, width - P:] = 1
            lengths[where] = P
            for layer, (key, value) in enumerate(method.prefix_kv()):   # (heads, P, head_dim)
                pad = (0, 0, width - P, 0)
                key = torch.nn.functional.pad(key.to(dtype), pad)[None]
                value = torch.nn.functional.pad(value.to(dtype), pad)[None]
                if rows is None:
                    keys[layer], values[layer] = (key.expand(batch, -1, -1, -1),
                                                  value.expand(batch, -1, -1, -1))
                else:
                    n = len(rows)
                    keys[layer] = keys[layer].index_copy(0, rows, key.expand(n, -1, -1, -1))
                    values[layer] = values[layer].index_copy(0, rows, value.expand(n, -1, -1, -1))
        cache = PrefixCache(mask, lengths, config=self.gpt2.config)
        for layer in range(s.n_layer):
            cache.update(keys[layer], values[layer], layer)
        return cache

    def forward(self, input_ids, token_type_ids=None, task_ids=None, attention_mask=None, position_ids=None,
                cache=None, use_cache=False, labels=None, logits_to_keep=0, virtual_ids=None):
        """input_ids, token_type_ids, attention_mask, position_ids, labels, virtual_ids: (batch, seq);
        task_ids: (batch,) task id per row or -1, or one int for every row; returns Hugging Face's
        CausalLMOutputWithPast. cache: a transformers Cache to extend (decoding), with
        use_cache=True; the output's `.cache` is the updated one.

        With labels only the loss is returned (the token-mean NLL, as Hugging Face computes it),
        from the logits of the labelled positions alone (see labelled_hidden and _loss)."""
        if labels is not None:
            hidden, targets = self.labelled_hidden(input_ids, labels, token_type_ids, task_ids,
                                                   attention_mask, virtual_ids=virtual_ids)
            return CausalLMOutputWithPast(loss=self._loss(hidden, targets))
        try:
            kwargs = self._prepare(input_ids, token_type_ids, task_ids, attention_mask, position_ids, cache,
                                   virtual_ids)
            return self.gpt2(**kwargs, use_cache=use_cache, logits_to_keep=logits_to_keep)
        finally:
            self._routing = self._segments = None
            self._clear_gates()

    def labelled_hidden(self, input_ids, labels, token_type_ids=None, task_ids=None, attention_mask=None,
                        virtual_ids=None):
        """(hidden (n, d), targets (n,)) for the n positions whose next token is a label.

        Training and validation need only these. Prompt positions (source, persona, history,
        MR) skip the output layer, a third of GPT-2 small's compute per token, and its
        (batch, seq, 50,287) logits never exist."""
        try:
            kwargs = self._prepare(input_ids, token_type_ids, task_ids, attention_mask, None, None,
                                   virtual_ids)
            hidden = self.gpt2.transformer(**kwargs, use_cache=False).last_hidden_state  # (batch, seq, d)
        finally:
            self._routing = self._segments = None
            self._clear_gates()
        targets = labels[:, 1:]                                   # position t predicts token t + 1
        keep = targets != IGNORE_INDEX                            # (batch, seq - 1)
        return hidden[:, :-1][keep], targets[keep]

    def labelled_logits(self, input_ids, labels, token_type_ids=None, task_ids=None, attention_mask=None,
                        virtual_ids=None):
        """(logits (n, vocab), targets (n,)) at the labelled positions (see labelled_hidden)."""
        hidden, targets = self.labelled_hidden(input_ids, labels, token_type_ids, task_ids, attention_mask,
                                               virtual_ids)
        return self.gpt2.lm_head(hidden), targets

    def _loss(self, hidden, targets):
        """Token-mean cross-entropy of hidden (n, d) against targets (n,). With gradients, the
        output layer runs over chunks of positions that are recomputed in backward, so only one
        chunk's logits exist at a time."""
        if not torch.is_grad_enabled():
            return F.cross_entropy(self.gpt2.lm_head(hidden).float(), targets)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(targets), LOSS_CHUNK):
            total = total + checkpoint(self._loss_sum, hidden[start:start + LOSS_CHUNK],
                                       targets[start:start + LOSS_CHUNK], use_reentrant=False)
        return total / len(targets)

    def _loss_sum(self, hidden, targets):
        return F.cross_entropy(self.gpt2.lm_head(hidden).float(), targets, reduction="sum")

    # --- what trains -----------------------------------------------------------------------------
    def mark_trainable(self, mode, task=None):
        """Set requires_grad for a training mode and return the trainable parameters.

        `task` is one task name or a list of them (multi-task training).
        full: everything. adapter (the name checkpoints keep for "per-task modules on a frozen
        backbone"): the tasks' methods + their own special-token rows. emb_only: only those rows.
        outputlayer_only: the whole (tied) embedding/output table. The table itself stays frozen
        in adapter and emb_only modes, so GPT-2's rows and other tasks' rows stay bit-identical;
        only the tasks' rows, held by `self.task_rows`, move."""
        if self.task_rows is not None:
            self.task_rows.detach_hooks()
            self.task_rows = None
        if mode == "full":
            for p in self.parameters():
                p.requires_grad_(True)
            return list(self.parameters())
        for p in self.parameters():
            p.requires_grad_(False)
        tasks = _task_list(task)
        if mode in ("adapter", "emb_only"):
            for t in tasks:
                if t not in self.tasks:
                    raise VLMError(f"task {t} is not in the model (has: {', '.join(self.tasks) or 'none'})")
            rows = {t: self.tasks[t].token_ids for t in tasks if self.tasks[t].token_ids}
            self.task_rows = TaskRows(self.gpt2, rows) if rows else None
            if mode == "adapter":
                for t in tasks:
                    for p in self.tasks[t].methods.parameters():
                        p.requires_grad_(True)
        elif mode == "outputlayer_only":
            self.gpt2.get_input_embeddings().weight.requires_grad_(True)
        else:
            raise ValueError(f"unknown training mode {mode!r}")
        return [p for p in self.parameters() if p.requires_grad]

    def count_trainable(self, mode, task=None):
        """Parameters that actually change in this mode (masked rows and pruned weights not counted)."""
        if mode == "full":
            return sum(p.numel() for p in self.parameters())
        if mode == "outputlayer_only":
            return self.gpt2.get_input_embeddings().weight.numel()
        tasks = _task_list(task)
        rows = sum(len(self.tasks[t].token_ids) for t in tasks) * self.gpt2.config.n_embd
        modules = (sum(p.numel() for t in tasks for p in self.tasks[t].methods.parameters())
                   - sum(pruned_count(m) for t in tasks for m in self.tasks[t].methods.values())
                   if mode == "adapter" else 0)
        return modules + rows

    def export_methods(self):
        """Swap every method for the form a checkpoint stores (prefix MLP and prompt encoder dropped)."""
        for task in self.tasks.values():
            for name, method in list(task.methods.items()):
                exported = method.exported()
                if exported is not method:
                    copy_masks(method, exported)
                    self.replace_method(task.name, name, exported)


def _rows(x, rows):
    return x if rows is None else x.index_select(0, rows)


def _drop_task_rows(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + "task_rows.")]:
        del state_dict[key]


def _task_list(task):
    return [task] if isinstance(task, str) else list(task)
