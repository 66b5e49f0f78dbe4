"""Data foundations every task kind uses: the tokenizer, reading JSON files and their splits,
tokenizing whole records, and length-grouped batches padded per batch. What a kind of task does
with its records (checks, input layouts, prompts) lives in the task package (tasks/)."""
import hashlib
import json
import logging
import os
import random
from itertools import chain

import torch
from transformers import GPT2TokenizerFast

from utils.errors import VLMError, json_kind
from utils.vocab import ALL_SPECIAL_TOKENS, GPT2_VOCAB_SIZE, PAD_ID, PAD_TOKEN, special_token_id

logger = logging.getLogger(__name__)

REPO_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                              "gpt2-tokenizer")
CACHE_VERSION = 1
IGNORE_INDEX = -100


# --- tokenizer -------------------------------------------------------------------------------
def load_tokenizer(name_or_path=REPO_TOKENIZER):
    """GPT-2's tokenizer with the 30 special tokens at their stable ids 50257-50286."""
    # Every GPT-2 size shares one BPE vocabulary, shipped in the repo: a hub name needs no download.
    has_files = os.path.isdir(name_or_path) and any(
        os.path.isfile(os.path.join(name_or_path, f)) for f in ("tokenizer.json", "vocab.json"))
    try:
        tokenizer = GPT2TokenizerFast.from_pretrained(name_or_path if has_files else REPO_TOKENIZER)
    except (OSError, ValueError) as error:
        raise VLMError(f"{name_or_path}: cannot load the tokenizer ({error})") from None
    if len(tokenizer) < GPT2_VOCAB_SIZE:
        raise VLMError(f"{name_or_path}: tokenizer has {len(tokenizer)} tokens; "
                       f"expected GPT-2's {GPT2_VOCAB_SIZE}")
    vocab = tokenizer.get_vocab()
    missing = [t for t in ALL_SPECIAL_TOKENS if t not in vocab]
    if missing:
        if len(tokenizer) != GPT2_VOCAB_SIZE:
            raise VLMError(f"{name_or_path}: tokenizer has {len(tokenizer)} tokens and lacks {missing[0]}")
        for token in ALL_SPECIAL_TOKENS:  # one at a time, so the ids follow our order
            tokenizer.add_special_tokens({"additional_special_tokens": [token]},
                                         replace_extra_special_tokens=False)
        tokenizer.pad_token = PAD_TOKEN
    ids = tokenizer.convert_tokens_to_ids(list(ALL_SPECIAL_TOKENS))
    for token, token_id in zip(ALL_SPECIAL_TOKENS, ids):
        if token_id != special_token_id(token):
            raise VLMError(f"tokenizer {name_or_path}: {token} has id {token_id}, "
                           f"expected {special_token_id(token)}")
    return tokenizer


def tokenizer_fingerprint(tokenizer):
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab]).encode()).hexdigest()


# --- reading and checking dataset files ------------------------------------------------------
def read_bytes(path, what=None):
    """A file's bytes; a missing or unreadable file is one VLMError naming it (and `what` it is)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise VLMError(f"{path}: {what + ' ' if what else ''}file not found") from None
    except OSError as error:
        raise VLMError(f"{path}: cannot read {what + ' file ' if what else ''}({error.strerror})") from None


def read_json_file(path, what="dataset"):
    raw = read_bytes(path, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise VLMError(f"{path}: not UTF-8 text (byte {error.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise VLMError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: "
                       f"{error.msg}") from None
    except RecursionError:
        raise VLMError(f"{path}: JSON nested too deeply") from None
    return value, raw


def read_text(path, what="text"):
    """A UTF-8 text file's contents (a leading byte-order mark dropped); errors name the file."""
    raw = read_bytes(path, what)
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise VLMError(f"{path}: not UTF-8 text (byte {error.start})") from None


def text_lines(text):
    """The items of a file written one a line (utils.io.write_lines): split at "\n" only, so a
    "\r" or U+2028 inside an item stays in it; the final newline ends the last item, and a "\r"
    before a newline (a Windows file) is dropped."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_jsonl(path):
    """[(line number, object)] of a JSON-lines file: one JSON object a line, blank lines skipped.
    Errors name the file and line: not UTF-8, invalid JSON, not an object, lone surrogates."""
    raw = read_bytes(path)
    records = []
    # Lines end at b"\n" only: JSON strings may hold U+2028 and other characters str.splitlines() splits on.
    for number, line in enumerate(raw.split(b"\n"), 1):
        where = f"{path}, line {number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise VLMError(f"{where}: not UTF-8 text (byte {error.start} of the line)") from None
        if number == 1:
            text = text.lstrip("\ufeff")
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise VLMError(f"{where}: invalid JSON at column {error.colno}: {error.msg}") from None
        except RecursionError:
            raise VLMError(f"{where}: JSON nested too deeply") from None
        if not isinstance(value, dict):
            raise VLMError(f"{where}: expected a JSON object, got {json_kind(value)}")
        check_unicode(value, where)
        records.append((number, value))
    return records


def check_unicode(obj, path):
    """JSON's \\u escapes can spell lone surrogates (\\ud800), which no tokenizer can encode."""
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise VLMError(f"{path}: the string {value[:40]!r} holds a lone surrogate escape "
                               f"(such as \\ud800): not valid Unicode text") from None


def split_records(dataset, split, path):
    """The records of one split; `val` is accepted for `valid` as the authors' loader did."""
    if not isinstance(dataset, dict):
        raise VLMError(f"{path}: expected a JSON object of splits, got {type(dataset).__name__}")
    key = split if split in dataset else ("val" if split == "valid" and "val" in dataset else None)
    if key is None:
        raise VLMError(f"{path}: no {split!r} split (has: {', '.join(dataset) or 'none'})")
    records = dataset[key]
    if not isinstance(records, list):
        raise VLMError(f"{path}: split {split!r} must be a list of records")
    if not records:
        raise VLMError(f"{path}: split {split!r} is empty")
    return records


def tokenize_structure(obj, tokenizer):
    """Every string becomes token ids, as the authors' get_dataset did (ids, turn_ids and dict
    keys kept). Unique strings are encoded in one batch by the Rust tokenizer."""
    strings = {}

    def collect(o, key=None):
        if isinstance(o, str):
            if key not in ("id", "turn_id"):
                strings.setdefault(o, None)
        elif isinstance(o, dict):
            for k, v in o.items():
                collect(v, k)
        elif isinstance(o, list):
            for v in o:
                collect(v)

    collect(obj)
    texts = list(strings)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    ids = dict(zip(texts, encoded))

    def convert(o, key=None):
        if isinstance(o, str):
            return o if key in ("id", "turn_id") else ids[o]
        if isinstance(o, dict):
            return {k: convert(v, k) for k, v in o.items()}
        if isinstance(o, list):
            return [convert(v) for v in o]
        return o

    return convert(obj)


def with_virtual_tokens(example, n):
    """The example with n virtual-token positions in front (prompt / p-tuning methods): the
    placeholder id PAD_ID (its embedding is replaced by the method's), segment -1 (none), no
    label; virtual_ids numbers them 0..n-1 and is -1 everywhere else."""
    return dict(example, input_ids=[PAD_ID] * n + list(example["input_ids"]),
                token_type_ids=[-1] * n + list(example["token_type_ids"]),
                labels=[IGNORE_INDEX] * n + list(example["labels"]),
                virtual_ids=list(range(n)) + [-1] * len(example["input_ids"]))


# --- batches ---------------------------------------------------------------------------------
def collate(examples, task_id, width=None):
    """Pad one batch on the right to its own longest example (or to `width`). task_ids: (batch,).
    virtual_ids (-1 padded) only when some example has virtual tokens."""
    length = width or max(len(e["input_ids"]) for e in examples)

    def pad(key, value, default=None):
        return torch.tensor([list(e.get(key, default(e)) if default else e[key])
                             + [value] * (length - len(e["input_ids"]))
                             for e in examples], dtype=torch.long)

    task_ids = [e.get("task_id", task_id) for e in examples]
    batch = {"input_ids": pad("input_ids", PAD_ID), "token_type_ids": pad("token_type_ids", PAD_ID),
             "labels": pad("labels", IGNORE_INDEX), "task_ids": torch.tensor(task_ids, dtype=torch.long)}
    if any("virtual_ids" in e for e in examples):
        batch["virtual_ids"] = pad("virtual_ids", -1, default=lambda e: [-1] * len(e["input_ids"]))
    return batch


def length_grouped_batches(indices, lengths, batch_size, pool, rng):
    """Shuffle, sort pools of `pool` batches by length (less padding), cut into batches."""
    indices = list(indices)
    rng.shuffle(indices)
    pool_size = pool * batch_size
    indices = list(chain.from_iterable(sorted(indices[i:i + pool_size], key=lambda j: -lengths[j])
                                       for i in range(0, len(indices), pool_size)))
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of similar length, so padding per batch stays small.

    Each epoch: shuffle (seeded by seed and epoch), cut into pools of `pool` batches, sort each
    pool by length, cut into batches, shuffle the batch order. Without shuffle: sorted by length.
    With num_replicas > 1 each process takes every num_replicas-th batch (equal counts)."""

    def __init__(self, lengths, batch_size, shuffle=True, seed=0, pool=50, num_replicas=1, rank=0):
        self.lengths, self.batch_size, self.shuffle = list(lengths), batch_size, shuffle
        self.seed, self.pool, self.num_replicas, self.rank = seed, pool, num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _all_batches(self):
        indices = list(range(len(self.lengths)))
        if not self.shuffle:
            indices.sort(key=lambda j: -self.lengths[j])
            return [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        rng = random.Random(self.seed + self.epoch)
        batches = length_grouped_batches(indices, self.lengths, self.batch_size, self.pool, rng)
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        batches = self._all_batches()
        per_replica = len(batches) // self.num_replicas if self.num_replicas > 1 else len(batches)
        return iter(batches[self.rank::self.num_replicas][:per_replica])

    def __len__(self):
        count = -(-len(self.lengths) // self.batch_size)
        return count // self.num_replicas if self.num_replicas > 1 else count
