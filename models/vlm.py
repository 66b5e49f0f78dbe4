"""Versatile Language Model: one GPT-2 from Hugging Face transformers, untouched, plus per-task
residual adapters after every block and task embeddings (30 added special-token rows).

The task is chosen per row: `task_ids` (batch,) holds a task id from utils.tasks or -1 (plain
GPT-2), so one forward pass serves rows of different tasks. Adapters are attached with forward
hooks, so the backbone's modules, parameter names and KV cache stay exactly Hugging Face's.
"""
import hashlib
import os

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging as hf_logging

from models.adapters import AdapterStack, count_parameters, freeze_all
from models.memory import set_training_attention, use_lean_gelu
from models.task_rows import TaskRows
from utils.data import IGNORE_INDEX
from utils.errors import VLMError
from utils.hub import require_hub
from utils.tasks import ALL_SPECIAL_TOKENS, GPT2_VOCAB_SIZE, TASK_BY_ID, TASKS, task_token_ids

VOCAB_SIZE = GPT2_VOCAB_SIZE + len(ALL_SPECIAL_TOKENS)  # 50,287
hf_logging.disable_progress_bar()  # our scripts show their own progress; keep stderr for errors
LOSS_CHUNK = 256  # labelled positions per chunk of the training loss: (256, 50,287) logits at a time
TASK_ROW_SEED = 20200408  # fixed, so every run over one backbone starts from the same new rows


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
        raise VLMError(f"--model_checkpoint {name_or_path}: cannot load a GPT-2 model ({_first_line(error)})") from None
    add_special_token_rows(gpt2)
    return gpt2


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

    Adapter checkpoints record it, so they are never loaded onto another backbone."""
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


class VersatileLM(nn.Module):
    def __init__(self, gpt2, adapter_bottlenecks=None):
        super().__init__()
        self.gpt2 = gpt2
        self.adapters = nn.ModuleDict()  # task name -> AdapterStack (one adapter per block)
        self._routing = None             # set for the duration of one forward pass
        self.task_rows = None            # TaskRows while adapter/emb_only training is set up
        use_lean_gelu(gpt2)              # same values, less training memory (models/memory.py)
        self.register_state_dict_post_hook(_drop_task_rows)  # views of wte: saved with the table
        for index, block in enumerate(gpt2.transformer.h):
            block.register_forward_hook(self._make_adapter_hook(index))
        for task, bottleneck in (adapter_bottlenecks or {}).items():
            self.add_adapter(task, bottleneck)

    def train(self, mode=True):
        set_training_attention(self.gpt2, mode)  # attention recomputed in backward (models/memory.py)
        return super().train(mode)

    @classmethod
    def from_pretrained(cls, name_or_path, adapter_bottlenecks=None, random_init=False):
        return cls(load_backbone(name_or_path, random_init), adapter_bottlenecks)

    @property
    def config(self):
        return self.gpt2.config

    @property
    def device(self):
        return self.gpt2.device

    def add_adapter(self, task, bottleneck):
        if task not in TASKS:
            raise VLMError(f"unknown task {task!r}")
        if bottleneck <= 0:
            raise VLMError(f"adapter bottleneck for {task} must be positive, got {bottleneck}")
        cfg = self.gpt2.config
        stack = AdapterStack(cfg.n_layer, cfg.n_embd, bottleneck, cfg.layer_norm_epsilon, cfg.initializer_range)
        self.adapters[task] = stack.to(device=self.gpt2.device, dtype=self.gpt2.dtype)

    def remove_adapter(self, task):
        del self.adapters[task]

    @property
    def adapter_bottlenecks(self):
        return {task: stack.bottleneck for task, stack in self.adapters.items()}

    # --- routing: which rows go through which task's adapters -----------------------------
    def _route(self, task_ids, batch_size):
        """[(adapter stack, row indices or None for all rows)] for the tasks present in the batch."""
        if task_ids is None:
            return []
        if isinstance(task_ids, int):
            task_ids = [task_ids] * batch_size
        elif torch.is_tensor(task_ids):
            task_ids = task_ids.tolist()  # one host sync per forward, not one per layer
        if len(task_ids) != batch_size:
            raise ValueError(f"task_ids has {len(task_ids)} entries for a batch of {batch_size}")
        rows_by_task = {}
        for row, task_id in enumerate(task_ids):
            if task_id != -1:
                rows_by_task.setdefault(task_id, []).append(row)
        routing = []
        for task_id, rows in rows_by_task.items():
            name = TASK_BY_ID[task_id].name if task_id in TASK_BY_ID else None
            if name not in self.adapters:
                raise VLMError(f"task id {task_id} ({name}) has no adapter in this model "
                               f"(has: {', '.join(self.adapters) or 'none'})")
            index = None if len(rows) == batch_size else torch.tensor(rows, device=self.gpt2.device)
            routing.append((self.adapters[name], index))
        return routing

    def _make_adapter_hook(self, layer):
        def hook(module, args, output):
            if not self._routing:
                return output
            hidden = output[0] if isinstance(output, tuple) else output  # (batch, seq, d_model)
            adapted = hidden
            for stack, rows in self._routing:
                if rows is None:  # the whole batch is one task: same arithmetic as a single-task model
                    adapted = stack[layer](hidden)
                else:
                    adapted = adapted.index_copy(0, rows, stack[layer](hidden.index_select(0, rows)))
            return (adapted,) + tuple(output[1:]) if isinstance(output, tuple) else adapted
        return hook

    def forward(self, input_ids, token_type_ids=None, task_ids=None, attention_mask=None,
                position_ids=None, cache=None, use_cache=False, labels=None,
                logits_to_keep=0):
        """input_ids, token_type_ids, attention_mask, position_ids, labels: (batch, seq);
        task_ids: (batch,) task id per row or -1; returns Hugging Face's CausalLMOutputWithPast.

        cache: a transformers Cache to extend (decoding), with use_cache=True; the output's
        `.cache` is the updated one. use_cache is False unless asked for: GPT-2's config
        defaults to True, which would build a cache nobody reads.

        With labels only the loss is returned (the token-mean NLL, as Hugging Face computes it),
        from the logits of the labelled positions alone (see labelled_hidden and _loss)."""
        if labels is not None:
            hidden, targets = self.labelled_hidden(input_ids, labels, token_type_ids, task_ids, attention_mask)
            return CausalLMOutputWithPast(loss=self._loss(hidden, targets))
        self._routing = self._route(task_ids, input_ids.shape[0])
        try:
            return self.gpt2(input_ids=input_ids, token_type_ids=token_type_ids,
                             attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, use_cache=use_cache,
                             logits_to_keep=logits_to_keep)
        finally:
            self._routing = None

    def labelled_hidden(self, input_ids, labels, token_type_ids=None, task_ids=None, attention_mask=None):
        """(hidden (n, d), targets (n,)) for the n positions whose next token is a label.

        Training and validation need only these. Prompt positions (source, persona, history,
        MR) skip the output layer, a third of GPT-2 small's compute per token, and its
        (batch, seq, 50,287) logits never exist."""
        self._routing = self._route(task_ids, input_ids.shape[0])
        try:
            hidden = self.gpt2.transformer(input_ids=input_ids, token_type_ids=token_type_ids,
                                           attention_mask=attention_mask,
                                           use_cache=False).last_hidden_state  # (batch, seq, d)
        finally:
            self._routing = None
        targets = labels[:, 1:]                                   # position t predicts token t + 1
        keep = targets != IGNORE_INDEX                            # (batch, seq - 1)
        return hidden[:, :-1][keep], targets[keep]

    def labelled_logits(self, input_ids, labels, token_type_ids=None, task_ids=None, attention_mask=None):
        """(logits (n, vocab), targets (n,)) at the labelled positions (see labelled_hidden)."""
        hidden, targets = self.labelled_hidden(input_ids, labels, token_type_ids, task_ids, attention_mask)
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

    # --- what trains -----------------------------------------------------------------------
    def mark_trainable(self, mode, task=None):
        """Set requires_grad for a training mode and return the trainable parameters.

        `task` is one task name or a list of them (multi-task training).
        full: everything. adapter: the tasks' adapters + their own special-token rows.
        emb_only: only those rows. outputlayer_only: the whole (tied) embedding/output table.
        The table itself stays frozen in adapter and emb_only modes, so GPT-2's rows and other
        tasks' rows stay bit-identical; only the tasks' rows, held by `self.task_rows`, move."""
        if self.task_rows is not None:
            self.task_rows.detach_hooks()
            self.task_rows = None
        wte = self.gpt2.get_input_embeddings().weight
        if mode == "full":
            for p in self.parameters():
                p.requires_grad_(True)
            return [p for p in self.parameters()]
        freeze_all(self)
        tasks = _task_list(task)
        if mode in ("adapter", "emb_only"):
            # The tasks' rows train as small views of the frozen table (models/task_rows.py).
            self.task_rows = TaskRows(self.gpt2, {t: task_token_ids(TASKS[t]) for t in tasks})
            if mode == "adapter":
                for t in tasks:
                    if t not in self.adapters:
                        raise VLMError(f"no adapter for task {t}")
                    for p in self.adapters[t].parameters():
                        p.requires_grad_(True)
        elif mode == "outputlayer_only":
            wte.requires_grad_(True)
        else:
            raise ValueError(f"unknown training mode {mode!r}")
        return [p for p in self.parameters() if p.requires_grad]

    def count_trainable(self, mode, task=None):
        """Parameters that actually change in this mode (masked rows not counted)."""
        if mode == "full":
            return count_parameters(self.parameters())
        if mode == "outputlayer_only":
            return self.gpt2.get_input_embeddings().weight.numel()
        tasks = _task_list(task)
        rows = sum(len(TASKS[t].special_tokens) for t in tasks) * self.gpt2.config.n_embd
        adapters = sum(count_parameters(self.adapters[t].parameters()) for t in tasks) if mode == "adapter" else 0
        return adapters + rows


def _drop_task_rows(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + "task_rows.")]:
        del state_dict[key]


def _task_list(task):
    return [task] if isinstance(task, str) else list(task)
