"""Datasets: the tokenizer, loading and checking the per-task JSON files, a tokenization cache,
the one input builder driven by the task table, and length-grouped batches padded per batch."""
import hashlib
import json
import logging
import os
import random
from itertools import chain

import torch
from transformers import GPT2TokenizerFast

from utils.errors import VLMError
from utils.io import write_json
from utils.vocab import ALL_SPECIAL_TOKENS, GPT2_VOCAB_SIZE, PAD_ID, PAD_TOKEN, special_token_id

logger = logging.getLogger(__name__)

REPO_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "gpt2-tokenizer")
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
        raise VLMError(f"{name_or_path}: tokenizer has {len(tokenizer)} tokens; expected GPT-2's {GPT2_VOCAB_SIZE}")
    vocab = tokenizer.get_vocab()
    missing = [t for t in ALL_SPECIAL_TOKENS if t not in vocab]
    if missing:
        if len(tokenizer) != GPT2_VOCAB_SIZE:
            raise VLMError(f"{name_or_path}: tokenizer has {len(tokenizer)} tokens and lacks {missing[0]}")
        for token in ALL_SPECIAL_TOKENS:  # one at a time, so the ids follow our order
            tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
        tokenizer.pad_token = PAD_TOKEN
    ids = tokenizer.convert_tokens_to_ids(list(ALL_SPECIAL_TOKENS))
    for token, token_id in zip(ALL_SPECIAL_TOKENS, ids):
        if token_id != special_token_id(token):
            raise VLMError(f"tokenizer {name_or_path}: {token} has id {token_id}, expected {special_token_id(token)}")
    return tokenizer


def tokenizer_fingerprint(tokenizer):
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab]).encode()).hexdigest()


# --- reading and checking dataset files ------------------------------------------------------
def read_json_file(path, what="dataset"):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise VLMError(f"{path}: {what} file not found") from None
    except OSError as error:
        raise VLMError(f"{path}: cannot read {what} file ({error.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise VLMError(f"{path}: not UTF-8 text (byte {error.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise VLMError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    except RecursionError:
        raise VLMError(f"{path}: JSON nested too deeply") from None
    return value, raw


def _check_unicode(obj, path):
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


def _fail(path, split, index, message):
    raise VLMError(f"{path}: split {split!r} record {index}: {message}")


def _check_str(value, path, split, index, key):
    if not isinstance(value, str):
        _fail(path, split, index, f"{key!r} must be a string, got {type(value).__name__}")


def _check_str_list(value, path, split, index, key, allow_empty=False):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(path, split, index, f"{key!r} must be a list of strings")
    if not value and not allow_empty:
        _fail(path, split, index, f"{key!r} is empty")


def _check_record(task, record, path, split, index):
    if not isinstance(record, dict):
        _fail(path, split, index, f"expected an object, got {type(record).__name__}")
    required = {"seq2seq": ("src", "tgt"), "nlg": ("src", "tgt"),
                "dialogue": ("document", "utterances") if task.name == "qa" else ("personality", "utterances")}
    for key in required[task.layout]:
        if key not in record:
            _fail(path, split, index, f"missing key {key!r}")
    if task.layout == "seq2seq":
        _check_str(record["src"], path, split, index, "src")
        _check_str(record["tgt"], path, split, index, "tgt")
    elif task.layout == "nlg":
        if not isinstance(record["src"], dict) or not record["src"]:
            _fail(path, split, index, "'src' must be a non-empty object of slot: value")
        for slot, value in record["src"].items():
            if slot not in task.slot_tokens:
                _fail(path, split, index, f"unknown NLG slot {slot!r} (known: {', '.join(task.slot_tokens)})")
            _check_str(value, path, split, index, f"src.{slot}")
        _check_str(record["tgt"], path, split, index, "tgt")
    else:
        context_key = "document" if task.name == "qa" else "personality"
        _check_str_list(record[context_key], path, split, index, context_key, allow_empty=task.name != "qa")
        if not isinstance(record["utterances"], list) or not record["utterances"]:
            _fail(path, split, index, "'utterances' must be a non-empty list")
        for turn, utterance in enumerate(record["utterances"]):
            where = f"utterances[{turn}]"
            if not isinstance(utterance, dict):
                _fail(path, split, index, f"{where} must be an object")
            for key in ("history", "candidates"):
                if key not in utterance:
                    _fail(path, split, index, f"{where} is missing key {key!r}")
                _check_str_list(utterance[key], path, split, index, f"{where}.{key}")


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


def _keep_gold_candidates(record):
    """Only the last candidate (the gold reply) is ever used: drop the rest before tokenizing."""
    if "utterances" not in record:
        return record
    record = dict(record)
    record["utterances"] = [{k: (v[-1:] if k in ("candidates", "distillated_candidates") else v)
                             for k, v in u.items()} for u in record["utterances"]]
    return record


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


def load_task_data(task, path, tokenizer, splits, cache_prefix=None):
    """{split: tokenized records} for the requested splits of a task's dataset file.

    Tokenized data is cached in `<cache_prefix>_<task>_<key>.json`, the key hashing the file's
    bytes, the tokenizer and the splits, so an edited file or another tokenizer never reuses it.
    A user task (utils/task_file.py) reads its folder of JSON-lines files instead (no cache:
    utils.templates.template_dataset)."""
    if task.layout == "template":
        from utils.templates import template_dataset  # templates builds on this module
        return template_dataset(task, path, tokenizer, splits)
    dataset, raw = read_json_file(path)
    records = {split: split_records(dataset, split, path) for split in splits}
    for split, rows in records.items():
        for index, record in enumerate(rows):
            _check_record(task, record, path, split, index)
        if task.layout in ("seq2seq", "nlg"):
            # Kept (the authors' loaders kept them too), but said: such a record teaches only eos.
            empty = sum(not record["tgt"].strip() for record in rows)
            if empty:
                logger.warning("%s: split %r: %d of %d records have an empty 'tgt'", path, split, empty, len(rows))
    key = hashlib.sha256(raw + tokenizer_fingerprint(tokenizer).encode()
                         + json.dumps([CACHE_VERSION, sorted(splits)]).encode()).hexdigest()[:20]
    cache_path = f"{cache_prefix}_{task.name}_{key}.json" if cache_prefix else None
    if cache_path and os.path.isfile(cache_path):
        logger.info("tokenized %s from cache %s", path, cache_path)
        cached, _ = read_json_file(cache_path, "cache")
        return cached
    _check_unicode(records, path)
    try:  # both walk the records recursively: extra keys nested near JSON's own limit overflow them
        tokenized = tokenize_structure({s: [_keep_gold_candidates(r) for r in rows] for s, rows in records.items()},
                                       tokenizer)
        if cache_path:
            write_json(cache_path, tokenized, indent=None)
    except RecursionError:
        raise VLMError(f"{path}: JSON nested too deeply") from None
    return tokenized


# --- the input builder -----------------------------------------------------------------------
def build_inputs(task, context, reply, with_eos=True):
    """Token ids, segment ids and labels of one example in the authors' layout.

    context: seq2seq: source ids; nlg: [(slot, value ids)] in the MR's order;
    dialogue/qa: (persona or [document] as lists of ids, history turns as lists of ids).
    Labels are -100 everywhere but the reply (and its eos)."""
    tok = [special_token_id(t) for t in task.special_tokens]
    bos, eos = tok[0], tok[1]
    reply = list(reply) + ([eos] if with_eos else [])
    if task.layout == "seq2seq":
        src, tgt = tok[2], tok[3]
        sequence = [[bos], [src] + list(context), [tgt] + reply]
        token_types = [bos] + [src] * len(sequence[1]) + [tgt] * len(sequence[2])
    elif task.layout == "nlg":
        response = special_token_id("<response>")
        sequence = [[bos]] + [[special_token_id(task.slot_tokens[slot])] + list(value) for slot, value in context] \
            + [[response] + reply]
        token_types = [bos] + [s[0] for s in sequence[1:-1] for _ in s] + [response] * len(sequence[-1])
    else:
        speaker1, speaker2, persona_token = tok[2], tok[3], tok[4]
        persona, history = context
        sequence = [[bos, persona_token] + list(chain(*persona))] + [list(t) for t in history] + [reply]
        # Speaker prefixes alternate backwards from the reply (always speaker2) ...
        sequence = [sequence[0]] + [[speaker1 if (len(sequence) - i) % 2 else speaker2] + s
                                    for i, s in enumerate(sequence[1:])]
        # ... but segment ids alternate forwards from the first turn: the authors' quirk, kept.
        token_types = [persona_token] * len(sequence[0]) + [speaker2 if i % 2 else speaker1
                                                            for i, s in enumerate(sequence[1:]) for _ in s]
    input_ids = list(chain(*sequence))
    labels = [IGNORE_INDEX] * (len(input_ids) - len(sequence[-1]) + 1) + sequence[-1][1:]
    return {"input_ids": input_ids, "token_type_ids": token_types, "labels": labels}


def _dialogue_context(task, record, utterance, max_history, persona):
    history = utterance["history"][-(2 * max_history + 1):]
    if task.name == "qa":
        persona = [record["document"][0][:task.max_source_tokens]]
    return persona, history


def iter_contexts(task, records, max_history, target_key=None, rotate_persona=True, for_training=True):
    """Yield (context, target ids, record, utterance) for every example of a split.

    Training follows the authors' loaders: seq2seq pairs under `min_tokens` dropped, sources and
    targets cut; persona sentences rotated by one after each utterance. Evaluation cuts only the
    source and keeps the persona fixed, as their evaluate.py did."""
    for record in records:
        if task.layout == "seq2seq":
            target = record[target_key or "tgt"]
            if for_training and (len(record["src"]) < task.min_tokens or len(target) < task.min_tokens):
                continue
            source = record["src"][:task.max_source_tokens] if task.max_source_tokens else record["src"]
            if for_training and task.max_target_tokens:
                target = target[:task.max_target_tokens]
            yield source, target, record, None
        elif task.layout == "nlg":
            yield list(record["src"].items()), record[target_key or "tgt"], record, None
        else:
            persona = list(record.get("personality", []))
            for utterance in record["utterances"]:
                context = _dialogue_context(task, record, utterance, max_history, persona)
                yield context, utterance[target_key or "candidates"][-1], record, utterance
                if rotate_persona and persona:
                    persona = [persona[-1]] + persona[:-1]


DISTILLED_KEY = "distillated_tgt"


def distilled_key(task):
    return "distillated_candidates" if task.layout == "dialogue" else DISTILLED_KEY


def training_examples(task, records, max_history, distillation=False, max_positions=None, where=""):
    """Examples (input_ids, token_type_ids, labels) of a split, in the authors' layout (a user
    task's: its template, with virtual_ids; longer than max_positions is an error naming the line)."""
    if task.layout == "template":
        examples = []
        for item in records:
            example = item["distilled"] if distillation else item["example"]
            if example is None:
                raise VLMError(f"{item['where']}: --distillation needs {DISTILLED_KEY!r}, which this record lacks")
            if max_positions and len(example["input_ids"]) > max_positions:
                raise VLMError(f"{item['where']}: the example has {len(example['input_ids'])} tokens, over the "
                               f"model's {max_positions} positions (lower the task's max_seq_length)")
            examples.append(example)
        if not examples:
            raise VLMError(f"{where}: no usable examples")
        return examples
    target_key = distilled_key(task) if distillation else None
    examples, too_long = [], 0
    for context, target, _, _ in iter_contexts(task, records, max_history, target_key):
        example = build_inputs(task, context, target)
        if max_positions and len(example["input_ids"]) > max_positions:
            too_long += 1
            continue
        examples.append(example)
    if too_long:
        logger.warning("%s: dropped %d examples longer than the model's %d positions", where, too_long, max_positions)
    if not examples:
        raise VLMError(f"{where}: no usable examples")
    return examples


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
        return torch.tensor([list(e.get(key, default(e)) if default else e[key]) + [value] * (length - len(e["input_ids"]))
                             for e in examples], dtype=torch.long)

    task_ids = [e.get("task_id", task_id) for e in examples]
    batch = {"input_ids": pad("input_ids", PAD_ID), "token_type_ids": pad("token_type_ids", PAD_ID),
             "labels": pad("labels", IGNORE_INDEX), "task_ids": torch.tensor(task_ids, dtype=torch.long)}
    if any("virtual_ids" in e for e in examples):
        batch["virtual_ids"] = pad("virtual_ids", -1, default=lambda e: [-1] * len(e["input_ids"]))
    return batch


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
        rng = random.Random(self.seed + self.epoch)
        if self.shuffle:
            rng.shuffle(indices)
            pool_size = self.pool * self.batch_size
            indices = list(chain.from_iterable(
                sorted(indices[i:i + pool_size], key=lambda j: -self.lengths[j])
                for i in range(0, len(indices), pool_size)))
        else:
            indices.sort(key=lambda j: -self.lengths[j])
        batches = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        batches = self._all_batches()
        per_replica = len(batches) // self.num_replicas if self.num_replicas > 1 else len(batches)
        return iter(batches[self.rank::self.num_replicas][:per_replica])

    def __len__(self):
        count = -(-len(self.lengths) // self.batch_size)
        return count // self.num_replicas if self.num_replicas > 1 else count
