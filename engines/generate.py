"""Decoding: batched, with a key/value cache, left padding, attention mask and position ids.

It yields exactly the tokens of the authors' method (batch of one, the whole sequence re-run for
every new token, no cache), which `generate_uncached` keeps as the reference and the baseline.
Rows may belong to different tasks; each stops at its own task's special tokens.
"""
import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from tasks.base import Prompt  # noqa: F401  (what decoding takes: tasks make them, callers import it here)
from tasks.template import without_virtual_positions
from utils.errors import VLMError
from utils.progress import progress_bar
from utils.vocab import PAD_ID

logger = logging.getLogger(__name__)


@dataclass
class DecodingOptions:
    max_length: int = 150
    min_length: int = 1
    no_sample: bool = False
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.9
    seed: int = 42


def filter_logits(logits, top_k=0, top_p=0.0, filter_value=-float("inf")):
    """Top-k and nucleus filtering, as the authors' top_filtering, for a (batch, vocab) tensor."""
    if top_k > 0:
        top_k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, top_k, dim=-1)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, filter_value)
    if top_p > 0.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the first token above the threshold
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_indices, remove), filter_value)
    return logits


class _Chooser:
    """Picks the next token of each row; sampling uses one generator per prompt, so a prompt's
    sample does not depend on which batch it shares."""

    def __init__(self, prompts, options, device, vocab_size):
        self.options = options
        self.stop_mask = self._mask([p.stop_ids for p in prompts], device, vocab_size)
        self.ban_mask = self._mask([p.banned_ids for p in prompts], device, vocab_size)
        self.generators = None
        if not options.no_sample:
            self.generators = [torch.Generator(device=device)
                               .manual_seed(options.seed + p.meta.get("index", i))
                               for i, p in enumerate(prompts)]

    @staticmethod
    def _mask(id_lists, device, vocab_size):
        if not any(id_lists):
            return None
        mask = torch.zeros(len(id_lists), vocab_size, dtype=torch.bool, device=device)
        for row, ids in enumerate(id_lists):
            mask[row, list(ids)] = True
        return mask

    def __call__(self, logits, rows, step):
        """logits: (n, vocab) for the prompts `rows` (indices into the prompt list); -> (n,) ids."""
        logits = logits.float()
        if self.ban_mask is not None:
            logits = logits.masked_fill(self.ban_mask[rows], -float("inf"))
        if step < self.options.min_length and self.stop_mask is not None:
            logits = logits.masked_fill(self.stop_mask[rows], -float("inf"))
        generators = None if self.generators is None else [self.generators[row] for row in rows.tolist()]
        return pick_tokens(logits, self.options, generators)


def pick_tokens(logits, options, generators):
    """The next token of each row of masked float logits (n, vocab): the argmax, or a sample after
    temperature, top-k and nucleus filtering, each row from its own generator. The server
    (engines/serve_engine.py) picks with this too, so its rows equal evaluate.py's."""
    if options.no_sample:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / options.temperature, options.top_k, options.top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=generator)
                      for i, generator in enumerate(generators)])


def virtual_token_count(model, task_id):
    """Virtual tokens the task with this id puts in front of its inputs (0 for plain GPT-2 rows)."""
    tasks = model.tasks_by_id() if hasattr(model, "tasks_by_id") else {}
    return tasks[task_id].num_virtual_tokens if task_id in tasks else 0


def with_virtual_positions(model, prompts, counts=None):
    """Prompts of prompt / p-tuning tasks with their virtual-token positions in front (once: a
    prompt that has virtual_ids already is kept as it is). A user task's prompt has them where its
    template says; they are taken out when the task has no virtual tokens in this model.
    counts: {task id: virtual tokens}, to read them from a snapshot instead of the model."""
    out = []
    for p in prompts:
        n = virtual_token_count(model, p.task_id) if counts is None else counts.get(p.task_id, 0)
        if p.virtual_ids is not None:
            if not n and any(v >= 0 for v in p.virtual_ids):
                kept = without_virtual_positions({"input_ids": p.input_ids,
                                                  "token_type_ids": p.token_type_ids,
                                                  "virtual_ids": p.virtual_ids})
                p = replace(p, input_ids=kept["input_ids"], token_type_ids=kept["token_type_ids"],
                            virtual_ids=None)
        elif n:
            p = replace(p, input_ids=[PAD_ID] * n + list(p.input_ids),
                        token_type_ids=[-1] * n + list(p.token_type_ids),
                        virtual_ids=list(range(n)) + [-1] * len(p.input_ids))
        out.append(p)
    return out


def padded_inputs(prompts, device):
    """The prompt pass's inputs, left-padded so every prompt ends at the same column and new
    tokens line up: input_ids, token_type_ids, attention_mask, position_ids (batch, width) and
    virtual_ids (or None where no row has virtual tokens)."""
    batch, width = len(prompts), max(len(p.input_ids) for p in prompts)
    input_ids = torch.full((batch, width), PAD_ID, dtype=torch.long)
    token_types = torch.full((batch, width), PAD_ID, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    virtual = (torch.full((batch, width), -1, dtype=torch.long) if any(p.virtual_ids for p in prompts)
               else None)
    for row, p in enumerate(prompts):
        n = len(p.input_ids)
        input_ids[row, width - n:] = torch.tensor(p.input_ids)
        token_types[row, width - n:] = torch.tensor(p.token_type_ids)
        attention[row, width - n:] = 1
        if virtual is not None and p.virtual_ids:
            virtual[row, width - n:] = torch.tensor(p.virtual_ids)
    virtual = virtual.to(device) if virtual is not None else None
    input_ids, token_types, attention = input_ids.to(device), token_types.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)                         # (batch, width)
    return input_ids, token_types, attention, virtual, positions


def _virtual_kwargs(virtual):
    """virtual_ids only where some row has virtual tokens (plain models take no such argument)."""
    return {} if virtual is None else {"virtual_ids": virtual}


@torch.inference_mode()
def generate_batch(model, prompts, options, on_step=None):
    """Decode a batch of prompts together; returns one list of generated ids per prompt.

    on_step(step, rows): called after each step's tokens are chosen (step 0 follows the pass over
    the prompts; `rows` were in that pass); bench/run.py times the decoding phase with it."""
    device = model.device
    prompts = with_virtual_positions(model, prompts)
    batch = len(prompts)
    input_ids, token_types, attention, virtual, positions = padded_inputs(prompts, device)
    task_ids = torch.tensor([p.task_id for p in prompts], device=device)
    reply_types = torch.tensor([p.reply_type for p in prompts], device=device)
    chooser = _Chooser(prompts, options, device, model.config.vocab_size)
    stop_sets = [set(p.stop_ids) for p in prompts]

    limits = [reply_room(model, p, options) for p in prompts]
    outputs = [[] for _ in prompts]
    rows = torch.arange(batch, device=device)  # prompts still decoding, in cache order
    cache = None  # a transformers DynamicCache after the first pass
    for step in range(options.max_length):
        out = model(input_ids, token_type_ids=token_types, task_ids=task_ids, attention_mask=attention,
                    position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1,
                    **_virtual_kwargs(virtual if step == 0 else None))
        cache = out.cache
        next_ids = chooser(out.logits[:, -1, :], rows, step)
        if on_step is not None:
            on_step(step, len(rows))
        keep = []
        for i, (row, token) in enumerate(zip(rows.tolist(), next_ids.tolist())):
            if token in stop_sets[row]:
                continue
            outputs[row].append(token)
            if len(outputs[row]) < limits[row]:
                keep.append(i)
        if not keep:
            break
        if len(keep) < len(rows):  # drop finished rows from the batch and the cache
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            rows, next_ids, attention = rows[index], next_ids[index], attention[index]
            positions, task_ids, reply_types = positions[index], task_ids[index], reply_types[index]
        input_ids = next_ids[:, None]                                            # (n, 1)
        token_types = reply_types[:, None]
        positions = positions[:, -1:] + 1
        attention = torch.cat([attention, attention.new_ones(len(rows), 1)], dim=-1)
    return outputs


def reply_limit(prompt, options):
    """Tokens a reply may have by the settings: --max_length, or the row's own smaller limit."""
    return options.max_length if prompt.max_length is None else min(options.max_length, prompt.max_length)


def reply_room(model, prompt, options):
    """Tokens a reply may have: reply_limit, or fewer where prompt and reply would not fit in the
    model's positions together (GPT-2's position table has no row past n_positions)."""
    return min(reply_limit(prompt, options), model.config.n_positions - len(prompt.input_ids))


def check_prompt_lengths(model, prompts, options, desc):
    """A prompt that fills the model's positions is an error; replies cut short are counted."""
    positions = model.config.n_positions
    for p in prompts:
        if len(p.input_ids) >= positions:
            what = ", ".join(f"{k} {str(p.meta[k])[:50]!r}" for k in ("input", "id", "mr", "where")
                             if k in p.meta)
            raise VLMError(f"{desc}: prompt {p.meta['index']}{f' ({what})' if what else ''} has "
                           f"{len(p.input_ids)} tokens; the model has only {positions} positions")
    cut = sum(reply_room(model, p, options) < reply_limit(p, options) for p in prompts)
    if cut:
        logger.warning("%s: %d of %d replies limited to fewer than --max_length %d tokens by the model's "
                       "%d positions", desc, cut, len(prompts), options.max_length, positions)


def generate(model, prompts, options, batch_size=32, progress=True, desc="decoding"):
    """Decode all prompts in batches of similar length; results in the prompts' order."""
    for index, p in enumerate(prompts):
        p.meta.setdefault("index", index)
    prompts = with_virtual_positions(model, prompts)
    check_prompt_lengths(model, prompts, options, desc)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].input_ids))
    results = [None] * len(prompts)
    with progress_bar(total=len(prompts), desc=desc, disable=not progress, unit="ex") as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, ids in zip(chunk, generate_batch(model, [prompts[i] for i in chunk], options)):
                results[i] = ids
            bar.update(len(chunk))
    return results


@torch.inference_mode()
def generate_uncached(model, prompt, options):
    """The authors' decoding: batch of one, no cache, the whole sequence re-run for every token."""
    device = model.device
    prompt = with_virtual_positions(model, [prompt])[0]
    chooser = _Chooser([prompt], options, device, model.config.vocab_size)
    row = torch.tensor([0], device=device)
    output = []
    for step in range(reply_room(model, prompt, options)):
        ids = torch.tensor([prompt.input_ids + output], device=device)
        types = torch.tensor([prompt.token_type_ids + [prompt.reply_type] * len(output)], device=device)
        virtual = None if prompt.virtual_ids is None else \
            torch.tensor([prompt.virtual_ids + [-1] * len(output)], device=device)
        logits = model(ids, token_type_ids=types, task_ids=torch.tensor([prompt.task_id], device=device),
                       use_cache=False, **_virtual_kwargs(virtual)).logits
        token = chooser(logits[:, -1, :], row, step).item()
        if token in prompt.stop_ids:
            break
        output.append(token)
    return output
