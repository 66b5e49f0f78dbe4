"""Continuous (iteration-level) batching: one decoding loop owns the model.

Every iteration of the loop (a thread of its own):
1. applies task changes whose task has no row running (admin add, replace, remove);
2. drops rows whose client left or whose time ran out;
3. admits waiting prompts, up to --max_batch_size rows, a bounded prompt pass (--prefill_tokens
   padded tokens) and the key/value budget (--max_cache_tokens), and runs their prompt pass;
   its first tokens are chosen, and the new rows join the running batch;
4. runs one decoding step over every running row: rows of every task and method share it.

A row computes exactly what evaluate.py computes for it: the same left-padded prompt pass, the same
cache, positions and masks, and tokens picked by engines.generate.pick_tokens with a generator
seeded as evaluate.py seeds it. Batch-mates only add masked columns, so a row's tokens do not
depend on who shares its batch or when it joined (tests/test_serve.py checks this against
evaluate.py under concurrent mixed traffic).

The running batch keeps one key/value cache: prefix-tuning columns first (left-padded to the
widest prefix), then every row's tokens, right-aligned, in GrowingLayers that keep room ahead so a
step writes in place. Joining rows are padded in; leaving rows are cut out, with the leading
columns no row needs any more.
"""

import collections
import logging
import threading
import time
from concurrent.futures import Future

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from engines.generate import padded_inputs, pick_tokens
from engines.serve_tasks import build_prompt
from models.routing import PrefixCache

logger = logging.getLogger(__name__)
STREAM_HOLDBACK = 16  # characters a stream holds back: the text clean-up may still change them


def sampling_group(options):
    """Rows whose DecodingOptions pick alike pick together."""
    return (options.no_sample, options.temperature, options.top_k, options.top_p)


class ServingError(Exception):
    """A request the server refuses or cannot finish: status (HTTP) and message."""

    def __init__(self, status, message, kind="invalid_request_error", param=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class Sequence:
    """One prompt being served: its task, prompt, DecodingOptions (evaluate.py's flags; max_length
    is the request's max_tokens) and what it has generated so far.

    on_event(seq, kind) is called from the loop's thread: kind "token" (seq.delta holds new text
    when seq.stream) or "done" (seq.text and seq.finish_reason, or seq.error)."""

    def __init__(
        self,
        served,
        prompt,
        options,
        index=0,
        stop=(),
        stream=False,
        on_event=None,
        item=None,
        where="prompt",
        deadline=None,
    ):
        self.served, self.prompt, self.options = served, prompt, options
        self.index, self.stop, self.stream, self.on_event = index, tuple(stop), stream, on_event
        self.item, self.where, self.deadline = item, where, deadline
        self.ids, self.text, self.emitted, self.delta = [], "", "", ""
        self.finish_reason, self.error = None, None
        self.cancelled = False
        self.submitted = time.monotonic()
        self.first_token_at = self.last_token_at = None
        self.generator = None
        self.limit = 0

    @property
    def task_name(self):
        return self.served.name

    @property
    def prompt_tokens(self):
        return sum(1 for v in (self.prompt.virtual_ids or [-1] * len(self.prompt.input_ids)) if v < 0)

    @property
    def finished(self):
        return self.finish_reason is not None or self.error is not None

    def reserve(self, n_positions):
        """Cache columns this row may come to need: prefix, prompt and every allowed token."""
        return self.served.prefix_tokens + min(n_positions, len(self.prompt.input_ids) + self.limit)


class Batch:
    """The running rows and their shared cache (see the module docstring)."""

    def __init__(self, seqs, cache, attention, positions, next_ids, ban, stop):
        self.seqs = seqs  # [Sequence], in cache row order
        self.cache = cache  # PrefixCache: (rows, heads, P + W, head_dim) per layer
        self.attention = attention  # (rows, W): 1 where a row has a token
        self.positions = positions  # (rows,): position of each row's last token
        self.next_ids = next_ids  # (rows,): the token each row feeds next
        self.ban, self.stop = ban, stop  # (rows, vocab) bool masks

    def __len__(self):
        return len(self.seqs)


class GrowingLayer(DynamicLayer):
    """A cache layer with room for more columns and rows: a decoding step writes its key and value
    in place, rows that leave are replaced by the last rows, and joining rows are written into the
    room. (DynamicLayer concatenates, copying the whole cache every step: a third of a GPT-2 small
    step at batch 128 on CPU; rebuilding it on every join and leave cost as much again.) Padding
    columns hold zeros, which the attention mask leaves out."""

    ROOM = 64  # columns allocated ahead; a full buffer is reallocated with this much more

    def __init__(self, rows, heads, width, head_dim, like, row_capacity=0):
        super().__init__()
        shape = (max(rows, row_capacity), heads, width + self.ROOM, head_dim)
        self.buffers = [like.new_zeros(shape) for _ in range(2)]
        self.rows, self.length = rows, width
        self.is_initialized = True
        self._expose()

    def _expose(self):
        self.keys, self.values = (b[: self.rows, :, : self.length] for b in self.buffers)

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        if self.length + n > self.buffers[0].shape[2]:
            grown = [
                b.new_zeros(b.shape[0], b.shape[1], self.length + n + self.ROOM, b.shape[3])
                for b in self.buffers
            ]
            for new, old in zip(grown, self.buffers):
                new[: self.rows, :, : self.length] = old[: self.rows, :, : self.length]
            self.buffers = grown
        for buffer, states in zip(self.buffers, (key_states, value_states)):
            buffer[: self.rows, :, self.length : self.length + n] = states
        self.length += n
        self._expose()
        return self.keys, self.values

    def fits(self, rows):
        return self.rows + rows <= self.buffers[0].shape[0]

    def keep_first(self, rows, holes, movers):
        """Keep `rows` rows: rows `movers` (beyond them) are copied into rows `holes` (among them)."""
        for buffer in self.buffers:
            if len(holes):
                buffer.index_copy_(0, holes, buffer.index_select(0, movers))
        self.rows = rows
        self._expose()

    def append(self, keys, values, prefix_width, part_prefix_width):
        """Write a part's rows after these: its prefix columns right-aligned at prefix_width, its
        token columns at this layer's length (the part is no wider in either)."""
        n, part_tokens = keys.shape[0], keys.shape[2] - part_prefix_width
        for buffer, part in zip(self.buffers, (keys, values)):
            rows = buffer[self.rows : self.rows + n]
            rows[:, :, : self.length] = 0  # a departed row's columns may still be there
            rows[:, :, prefix_width - part_prefix_width : prefix_width] = part[:, :, :part_prefix_width]
            rows[:, :, self.length - part_tokens : self.length] = part[:, :, part_prefix_width:]
        self.rows += n
        self._expose()


def running_cache(prefix_mask, prefix_lengths, layers):
    """The running batch's PrefixCache over GrowingLayers."""
    cache = PrefixCache(prefix_mask, prefix_lengths)
    cache.layers = layers
    return cache


def _as_prefix_cache(cache, rows):
    """A prompt pass's cache as the running batch's (a PrefixCache, of width 0 where no row has a
    prefix, over GrowingLayers)."""
    keys = cache.layers[0].keys
    if isinstance(cache, PrefixCache):
        mask, lengths = cache.prefix_mask, cache.prefix_lengths
    else:
        mask = torch.zeros(rows, 0, dtype=torch.long, device=keys.device)
        lengths = torch.zeros(rows, dtype=torch.long, device=keys.device)
    layers = []
    for part in cache.layers:
        layer = GrowingLayer(rows, keys.shape[1], keys.shape[2], keys.shape[3], keys)
        layer.keys.copy_(part.keys)
        layer.values.copy_(part.values)
        layers.append(layer)
    return running_cache(mask, lengths, layers)


def _row_state(batch, order):
    """The per-row tensors of a batch in a new row order (a list of row indices)."""
    index = torch.tensor(order, device=batch.attention.device)
    return [
        t.index_select(0, index)
        for t in (
            batch.attention,
            batch.positions,
            batch.next_ids,
            batch.ban,
            batch.stop,
            batch.cache.prefix_mask,
            batch.cache.prefix_lengths,
        )
    ]


def merge_batches(a, b, row_capacity=0):
    """One Batch of a's rows then b's, columns padded to the wider of each part. When b is no
    wider than a and a's buffers have room, b's rows are written into them; otherwise the cache
    is rebuilt (with room for row_capacity rows)."""
    if a is None:
        return b
    pa, pb = a.cache.prefix_width, b.cache.prefix_width
    wa, wb = a.attention.shape[1], b.attention.shape[1]
    P, W = max(pa, pb), max(wa, wb)
    na = len(a)
    if P == pa and W == wa and a.cache.layers[0].fits(len(b)):
        for la, lb in zip(a.cache.layers, b.cache.layers):
            la.append(lb.keys, lb.values, pa, pb)
        layers = a.cache.layers
    else:
        layers = []
        for la, lb in zip(a.cache.layers, b.cache.layers):
            layer = GrowingLayer(
                na + len(b), la.keys.shape[1], P + W, la.keys.shape[3], la.keys, row_capacity
            )
            for merged, ta, tb in ((layer.keys, la.keys, lb.keys), (layer.values, la.values, lb.values)):
                # each part right-aligned: prefix columns end at P, token columns at P + W
                merged[:na, :, P - pa : P] = ta[:, :, :pa]
                merged[:na, :, P + W - wa :] = ta[:, :, pa:]
                merged[na:, :, P - pb : P] = tb[:, :, :pb]
                merged[na:, :, P + W - wb :] = tb[:, :, pb:]
            layers.append(layer)
    cache = running_cache(
        torch.cat([F.pad(a.cache.prefix_mask, (P - pa, 0)), F.pad(b.cache.prefix_mask, (P - pb, 0))]),
        torch.cat([a.cache.prefix_lengths, b.cache.prefix_lengths]),
        layers,
    )
    return Batch(
        a.seqs + b.seqs,
        cache,
        torch.cat([F.pad(a.attention, (W - wa, 0)), F.pad(b.attention, (W - wb, 0))]),
        torch.cat([a.positions, b.positions]),
        torch.cat([a.next_ids, b.next_ids]),
        torch.cat([a.ban, b.ban]),
        torch.cat([a.stop, b.stop]),
    )


def _dead_columns(mask):
    """Leading columns of a (rows, columns) mask that no row uses."""
    return int((mask.sum(0) == 0).long().cumprod(0).sum()) if mask.shape[1] else 0


def keep_rows(batch, keep, row_capacity=0):
    """The Batch of rows `keep` (ascending indices). The last kept rows move into the places of
    those that left (a copy of the moved rows only); once a quarter of the columns (at least 16)
    are used by no row, the cache is rebuilt without them (select_rows)."""
    n = len(keep)
    kept = set(keep)
    holes = [i for i in range(n) if i not in kept]
    movers = [i for i in keep if i >= n]
    order = list(range(n))
    for hole, mover in zip(holes, movers):
        order[hole] = mover
    attention, positions, next_ids, ban, stop, prefix_mask, prefix_lengths = _row_state(batch, order)
    dead = _dead_columns(attention)
    if dead >= 16 and 4 * dead >= attention.shape[1]:
        return select_rows(batch, keep, row_capacity)
    device = attention.device
    for layer in batch.cache.layers:
        layer.keep_first(n, torch.tensor(holes, device=device), torch.tensor(movers, device=device))
    cache = running_cache(prefix_mask, prefix_lengths, batch.cache.layers)
    return Batch([batch.seqs[i] for i in order], cache, attention, positions, next_ids, ban, stop)


def select_rows(batch, keep, row_capacity=0):
    """The Batch of rows `keep` (indices, in that order) in a rebuilt cache, without the leading
    columns none of them uses."""
    device = batch.attention.device
    index = torch.tensor(keep, device=device)
    attention, positions, next_ids, ban, stop, prefix_mask, prefix_lengths = _row_state(batch, keep)
    real_dead, prefix_dead = _dead_columns(attention), _dead_columns(prefix_mask)
    P = batch.cache.prefix_width
    columns = torch.cat(
        [
            torch.arange(prefix_dead, P, device=device),
            torch.arange(P + real_dead, P + attention.shape[1], device=device),
        ]
    )
    layers = []
    for part in batch.cache.layers:
        layer = GrowingLayer(
            len(keep), part.keys.shape[1], len(columns), part.keys.shape[3], part.keys, row_capacity
        )
        layer.keys.copy_(part.keys.index_select(0, index).index_select(2, columns))
        layer.values.copy_(part.values.index_select(0, index).index_select(2, columns))
        layers.append(layer)
    cache = running_cache(prefix_mask[:, prefix_dead:], prefix_lengths, layers)
    return Batch(
        [batch.seqs[i] for i in keep], cache, attention[:, real_dead:], positions, next_ids, ban, stop
    )


class ServingEngine:
    """The decoding loop and its queue. submit() and cancel() may be called from any thread."""

    def __init__(
        self,
        model,
        tokenizer,
        tasks,
        max_batch_size=32,
        max_queue=256,
        prefill_tokens=1024,
        max_cache_tokens=None,
        metrics=None,
        static_batching=None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.tasks = dict(tasks)  # {name: ServedTask}: the current snapshot (replaced whole)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.prefill_tokens = prefill_tokens
        self.n_positions = model.config.n_positions
        self.max_cache_tokens = max_cache_tokens or max_batch_size * self.n_positions
        self.metrics = metrics
        # (max rows, wait seconds): collect prompts, run the batch to its end, only then admit more
        self.static_batching = static_batching
        self.waiting = collections.deque()
        self.batch = None
        self.changes = []  # [(task name or None, fn, Future)], applied in the loop
        self.held = set()  # tasks whose change waits: their prompts are not admitted
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.draining = False
        self.thread = None
        self.vocab = model.config.vocab_size
        self.device = model.device
        self._masks = {}
        self.mask_start = self.vocab  # the lowest token id any stop or ban mask holds

    # --- the API's side -----------------------------------------------------------------------
    def start(self):
        self.thread = threading.Thread(target=self._run, name="vlm-decoding-loop", daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, seqs):
        """Queue a request's prompts (all or none): ServingError 503 when draining, 429 when full."""
        for seq in seqs:
            seq.limit = self._limit(seq)
            if seq.reserve(self.n_positions) > self.max_cache_tokens:
                raise ServingError(
                    400,
                    f"max_tokens: the input and {seq.limit} new tokens need "
                    f"{seq.reserve(self.n_positions)} cache positions; this server holds at most "
                    f"{self.max_cache_tokens} (--max_cache_tokens)",
                    param="max_tokens",
                )
        with self.lock:
            if self.draining:
                raise ServingError(503, "the server is shutting down", "server_error")
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise ServingError(
                    429,
                    f"the queue is full ({self.max_queue} prompts waiting); retry later",
                    "rate_limit_error",
                )
            self.waiting.extend(seqs)
        self.wake.set()

    def cancel(self, seqs):
        for seq in seqs:
            seq.cancelled = True
        self.wake.set()

    def change(self, fn, task_names=()):
        """Run fn(engine) in the loop once no row of `task_names` runs (their prompts wait
        meanwhile); returns a Future of fn's result. Rows of other tasks never wait for it."""
        future = Future()
        names = frozenset(task_names)
        with self.lock:
            self.changes.append((names, fn, future))
            self.held.update(names)
        self.wake.set()
        return future

    def counts(self):
        """(waiting prompts, running rows, cache positions in use, cache bytes)."""
        batch = self.batch
        if batch is None:
            return len(self.waiting), 0, 0, 0
        cells = len(batch) * (batch.cache.prefix_width + batch.attention.shape[1])
        layer = batch.cache.layers[0].keys
        per_cell = 2 * self.model.config.n_layer * layer.shape[1] * layer.shape[3] * layer.element_size()
        return len(self.waiting), len(batch), cells, cells * per_cell

    def idle(self):
        return not self.waiting and self.batch is None and not self.changes

    # --- the loop -------------------------------------------------------------------------------
    def _run(self):
        while not self.stopping:
            try:
                worked = self._iteration()
            except Exception as error:  # a bug must not leave clients waiting forever
                logger.exception("decoding loop failed")
                self._fail_everything(f"the decoding loop failed: {type(error).__name__}: {error}")
                worked = False
            if self.metrics is not None:
                self.metrics.loop_state(*self.counts())
            if not worked:
                self.wake.wait(timeout=0.05)
                self.wake.clear()

    @torch.inference_mode()
    def _iteration(self):
        self._apply_changes()
        self._drop_abandoned()
        joiners = self._admit()
        if joiners:
            self._prompt_pass(joiners)
        if self.batch is not None:
            self._step()
        return bool(joiners) or self.batch is not None

    def _apply_changes(self):
        with self.lock:
            pending = list(self.changes)
        running = {seq.task_name for seq in self.batch.seqs} if self.batch is not None else set()
        for change in pending:
            names, fn, future = change
            if names & running:
                continue
            with self.lock:
                self.changes.remove(change)
                self.held = set().union(*(other for other, _, _ in self.changes))
            try:
                future.set_result(fn(self))
            except Exception as error:  # the change's own error goes to its caller; serving goes on
                future.set_exception(error)

    def _drop_abandoned(self):
        now = time.monotonic()
        with self.lock:
            gone = [s for s in self.waiting if s.cancelled or (s.deadline is not None and now > s.deadline)]
            for seq in gone:
                self.waiting.remove(seq)
        for seq in gone:
            self._end_abandoned(seq, now)
        if self.batch is not None:
            keep = [
                i
                for i, s in enumerate(self.batch.seqs)
                if not s.cancelled and (s.deadline is None or now <= s.deadline)
            ]
            if len(keep) < len(self.batch):
                for i in set(range(len(self.batch))) - set(keep):
                    self._end_abandoned(self.batch.seqs[i], now)
                self._keep_rows(keep)

    def _end_abandoned(self, seq, now):
        if seq.cancelled:
            self._finish(seq, error=ServingError(499, "the client closed the request", "cancelled"))
        else:
            self._finish(seq, error=ServingError(504, "the request timed out (--request_timeout)", "timeout"))

    def _admit(self):
        """Waiting prompts that join now (FIFO; a held task's prompts wait for its change)."""
        if self._static_wait():
            return []
        rows = len(self.batch) if self.batch is not None else 0
        reserve = max((s.reserve(self.n_positions) for s in self.batch.seqs), default=0) if rows else 0
        joiners, width = [], 0
        limit_rows = self.max_batch_size if self.static_batching is None else self.static_batching[0]
        with self.lock:
            for seq in list(self.waiting):
                if rows + len(joiners) >= limit_rows:
                    break
                if seq.task_name in self.held:
                    continue
                new_width = max(width, len(seq.prompt.input_ids))
                new_reserve = max(reserve, seq.reserve(self.n_positions))
                if joiners and (len(joiners) + 1) * new_width > self.prefill_tokens:
                    break
                if (rows + len(joiners) + 1) * new_reserve > self.max_cache_tokens:
                    break
                joiners.append(seq)
                width, reserve = new_width, new_reserve
            for seq in joiners:
                self.waiting.remove(seq)
        return [seq for seq in joiners if self._current(seq)]

    def _static_wait(self):
        """Static batching admits only into an empty batch, after N prompts or T seconds of waiting."""
        if self.static_batching is None:
            return False
        if self.batch is not None:
            return True
        rows, wait = self.static_batching
        with self.lock:
            if not self.waiting:
                return True
            oldest = self.waiting[0].submitted
        return len(self.waiting) < rows and time.monotonic() - oldest < wait

    def _current(self, seq):
        """Rebuild a prompt queued before its task was replaced; a removed task's prompt fails."""
        served = self.tasks.get(seq.task_name)
        if served is None:
            self._finish(
                seq, error=ServingError(404, f"model: the task {seq.task_name!r} was removed", param="model")
            )
            return False
        if served.version != seq.served.version:
            try:
                seq.prompt = build_prompt(served, seq.item, self.tokenizer, self.n_positions, seq.where)
            except Exception as error:
                self._finish(seq, error=ServingError(400, str(error), param="prompt"))
                return False
            seq.served = served
            seq.limit = self._limit(seq)
        return True

    def _limit(self, seq):
        """evaluate.py's reply_room: max_tokens, the task's own cap, and the model's positions."""
        limit = seq.options.max_length
        if seq.prompt.max_length is not None:
            limit = min(limit, seq.prompt.max_length)
        return min(limit, self.n_positions - len(seq.prompt.input_ids))

    def _mask(self, ids):
        key = tuple(ids)
        if key not in self._masks:
            mask = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
            if ids:
                mask[list(ids)] = True
                self.mask_start = min(self.mask_start, min(ids))
            self._masks[key] = mask
        return self._masks[key]

    def _prompt_pass(self, seqs):
        """The joiners' prompt pass (as generate_batch's step 0), their first tokens, and the merge."""
        model = self.model
        prompts = [s.prompt for s in seqs]
        input_ids, token_types, attention, virtual, positions = padded_inputs(prompts, self.device)
        task_ids = torch.tensor([p.task_id for p in prompts], device=self.device)
        for seq in seqs:
            if not seq.options.no_sample:
                # evaluate.py seeds prompt i of its input with seed + i
                seq.generator = torch.Generator(device=self.device).manual_seed(seq.options.seed + seq.index)
        out = model(
            input_ids,
            token_type_ids=token_types,
            task_ids=task_ids,
            attention_mask=attention,
            position_ids=positions,
            cache=None,
            use_cache=True,
            logits_to_keep=1,
            **({} if virtual is None else {"virtual_ids": virtual}),
        )
        ban = torch.stack([self._mask(p.banned_ids) for p in prompts])
        stop = torch.stack([self._mask(p.stop_ids) for p in prompts])
        part = Batch(
            list(seqs),
            _as_prefix_cache(out.cache, len(seqs)),
            attention,
            positions[:, -1],
            torch.zeros(len(seqs), dtype=torch.long, device=self.device),
            ban,
            stop,
        )
        tokens = self._choose(out.logits[:, -1, :], part)
        keep = [i for i, (seq, token) in enumerate(zip(seqs, tokens)) if self._accept(seq, token)]
        if not keep:
            return
        part.next_ids = torch.tensor(tokens, device=self.device)
        if len(keep) < len(seqs):
            part = select_rows(part, keep)
        self.batch = merge_batches(self.batch, part, self.max_batch_size)

    def _step(self):
        """One decoding step of every running row."""
        batch = self.batch
        rows = len(batch)
        attention = torch.cat([batch.attention, batch.attention.new_ones(rows, 1)], dim=1)
        positions = batch.positions + 1
        task_ids = torch.tensor([s.prompt.task_id for s in batch.seqs], device=self.device)
        reply_types = torch.tensor([[s.prompt.reply_type] for s in batch.seqs], device=self.device)
        out = self.model(
            batch.next_ids[:, None],
            token_type_ids=reply_types,
            task_ids=task_ids,
            attention_mask=attention,
            position_ids=positions[:, None],
            cache=batch.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        batch.cache, batch.attention, batch.positions = out.cache, attention, positions
        tokens = self._choose(out.logits[:, -1, :], batch)
        keep = [i for i, (seq, token) in enumerate(zip(batch.seqs, tokens)) if self._accept(seq, token)]
        batch.next_ids = torch.tensor(tokens, device=self.device)
        self._keep_rows(keep)

    def _keep_rows(self, keep):
        if not keep:
            self.batch = None
        elif len(keep) < len(self.batch):
            self.batch = keep_rows(self.batch, keep, self.max_batch_size)

    def _choose(self, logits, batch):
        """The next token of every row (evaluate.py's _Chooser, row by row settings); a row whose
        logits are not finite (a damaged task module) gets -1 and ends with an error.

        The 50k-way work is kept to what it must be: one pass finds broken rows (NaN or inf
        anywhere makes a row's sum so), the masks act only on the columns from the lowest masked
        id (the added tokens and <|endoftext|>), and rows picking alike pick in one call."""
        logits = logits.float()
        broken = (~torch.isfinite(logits.sum(dim=-1))).tolist()
        start = self.mask_start
        tail = logits[:, start:]  # a view: the masks write into logits
        tail.masked_fill_(batch.ban[:, start:], -float("inf"))
        early = [len(s.ids) < s.options.min_length for s in batch.seqs]
        if any(early):
            rows = torch.tensor(early, device=self.device)[:, None]
            tail.masked_fill_(batch.stop[:, start:] & rows, -float("inf"))
        groups = collections.defaultdict(list)
        for row, seq in enumerate(batch.seqs):
            if not broken[row]:
                groups[sampling_group(seq.options)].append(row)
        tokens = [-1] * len(batch)
        for rows in groups.values():
            seqs = [batch.seqs[r] for r in rows]
            own = (
                logits
                if len(rows) == len(batch)
                else logits.index_select(0, torch.tensor(rows, device=self.device))
            )
            picked = pick_tokens(own, seqs[0].options, [s.generator for s in seqs])
            for row, token in zip(rows, picked.tolist()):
                tokens[row] = token
        return tokens

    def _accept(self, seq, token):
        """Take a row's new token; True while the row goes on."""
        if token < 0:
            self._finish(
                seq,
                error=ServingError(
                    500,
                    f"task {seq.task_name}: the model's output is not a number "
                    "(NaN or infinite logits): its task module is damaged",
                    "server_error",
                ),
            )
            return False
        if token in seq.prompt.stop_ids:
            self._finish(seq, "stop")
            return False
        now = time.monotonic()
        if self.metrics is not None:
            since = seq.submitted if seq.first_token_at is None else seq.last_token_at
            self.metrics.token(seq.task_name, now - since, first=seq.first_token_at is None)
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.last_token_at = now
        seq.ids.append(token)
        if seq.stop or seq.stream:
            text = seq.served.task.output_text(self.tokenizer, seq.ids)
            cut = min((i for i in (text.find(s) for s in seq.stop) if i >= 0), default=-1)
            if cut >= 0:
                seq.text = text[:cut]
                self._finish(seq, "stop", text_known=True)
                return False
            if seq.stream:
                stable = text[: max(0, len(text) - STREAM_HOLDBACK)]
                if len(stable) > len(seq.emitted) and stable.startswith(seq.emitted):
                    seq.delta, seq.emitted = stable[len(seq.emitted) :], stable
                    self._emit(seq, "token")
                elif len(seq.ids) == 1:  # the first token always shows, if only as an empty chunk
                    seq.delta = ""
                    self._emit(seq, "token")
        if len(seq.ids) >= seq.limit:
            self._finish(seq, "length")
            return False
        return True

    def _finish(self, seq, reason=None, error=None, text_known=False):
        if error is not None:
            seq.error = error
        else:
            if not text_known:
                seq.text = seq.served.task.output_text(self.tokenizer, seq.ids)
            seq.finish_reason = reason
            if seq.stream:
                if not seq.text.startswith(seq.emitted):  # never expected: the hold-back covers the clean-up
                    logger.warning(
                        "stream of %s: final text does not extend the streamed text", seq.task_name
                    )
                seq.delta, seq.emitted = seq.text[len(seq.emitted) :], seq.text
        self._emit(seq, "done")

    def _emit(self, seq, kind):
        if seq.on_event is not None:
            try:
                seq.on_event(seq, kind)
            except Exception:  # a client's callback must not stop the loop
                logger.exception("event callback failed")

    def _fail_everything(self, message):
        seqs = list(self.batch.seqs) if self.batch is not None else []
        with self.lock:
            seqs += list(self.waiting)
            self.waiting.clear()
        self.batch = None
        for seq in seqs:
            if not seq.finished:
                self._finish(seq, error=ServingError(500, message, "server_error"))
