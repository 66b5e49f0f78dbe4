"""What a kind of task is: the one interface the engines read, and what built-in kinds share.

A task object answers every question the engines have about a task; the engines never ask for
its name or its kind. Its data (name, id in a combined model, special tokens, splits, the
authors' hyper-parameters, metrics) comes from the task table (tasks/table.py) or a task file
(tasks/task_file.py). Its behaviour is its class's:

    data       check_dataset_path, load_data (checked, tokenized records), training_examples
    decoding   dataset_prompts (with references), input_prompt (an --input payload), output_text
    outputs    write_outputs (the files the official scorers read), references, score; and for
               score.py read_outputs, read_references (those files back), score_references
    distilling distilled_path, check_distilled, distillation_job
    model      vocab_token_ids (the task's own embedding rows), checkpoint_meta

Built-in kinds (seq2seq.py, nlg.py, dialogue.py, qa.py) build the authors' input layouts from
per-kind `check_fields`, `iter_contexts` and `build_inputs`; the template kind of user tasks
(template.py) builds NeMo-style prompt templates.
"""
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

from tasks.metrics import METRICS
from utils.data import (
    CACHE_VERSION,
    check_unicode,
    read_json_file,
    read_text,
    split_records,
    text_lines,
    tokenize_structure,
    tokenizer_fingerprint,
)
from utils.errors import VLMError
from utils.io import write_json, write_lines
from utils.vocab import ALL_SPECIAL_TOKENS, GPT2_VOCAB_SIZE, builtin_token_ids, special_token_id

logger = logging.getLogger(__name__)

DISTILLED_KEY = "distillated_tgt"   # a record's distilled target (the authors' name)
DISTILLED_SUFFIX = ".distilled.json"


@dataclass(frozen=True)
class Hyper:
    """Batch size x accumulation, epochs and learning rate of the authors' run.sh."""
    train_batch_size: int
    gradient_accumulation_steps: int
    n_epochs: int
    lr: float


@dataclass
class Prompt:
    """One row to decode: what a task makes of one input, and what decoding needs to know of it."""
    input_ids: list            # prompt tokens, ending with the reply's segment token
    token_type_ids: list       # same length; the last one is the reply segment
    task_id: int = -1          # adapter to use (-1: plain GPT-2)
    stop_ids: tuple = ()       # generation stops at any of these (the task's special tokens)
    banned_ids: tuple = ()     # never generated (other tasks' tokens in a combined model)
    meta: dict = field(default_factory=dict)
    virtual_ids: list = None   # -1, or the virtual token at that position (prompt / p-tuning tasks)
    max_length: int = None     # the most tokens of this row's reply (a user task's max_answer_tokens)

    @property
    def reply_type(self):
        return self.token_type_ids[-1]


@dataclass
class DistillationJob:
    """What a task gives the distiller: one prompt per training example, the bytes the outputs
    depend on (for the resume settings), and `write(output_path, texts)`, which writes the
    distilled copy of the dataset from the raw decoded texts, one per prompt."""
    prompts: list
    source_bytes: bytes
    write: object


def clean_up_tokenization(text):
    """The space clean-up pytorch-transformers 1.2 applied in decode(), which the authors' scores
    include (transformers 5 no longer does it for GPT-2)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


def decode_text(tokenizer, ids, cleanup=True):
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return clean_up_tokenization(text) if cleanup else text


def banned_ids_except(own):
    """Added tokens a task never generates: `<pad>` and every added token not in `own`.

    The authors masked other tasks' tokens when decoding with the combined model; evaluate.py
    applies the same mask, so a single-task checkpoint and the combined model decode alike."""
    own = set(own)
    return tuple(i for i in range(GPT2_VOCAB_SIZE, GPT2_VOCAB_SIZE + len(ALL_SPECIAL_TOKENS)) if i not in own)


class TaskKind:
    """The interface of every task (see the module docstring); subclasses implement it."""
    name: str
    task_id: int
    metrics: tuple = ()
    method_from_task_file = False  # a user task trains its task file's method on the frozen backbone
    kind = ""                      # what /v1/models calls it: seq2seq, nlg, dialogue, qa, template, text

    # --- data ------------------------------------------------------------------------------------
    def check_dataset_path(self, path, shown=None):
        raise NotImplementedError

    def load_data(self, path, tokenizer, splits, cache_prefix=None):
        raise NotImplementedError

    def training_examples(self, records, max_history, distillation=False, max_positions=None, where=""):
        raise NotImplementedError

    # --- decoding ---------------------------------------------------------------------------------
    def stop_ids(self):
        raise NotImplementedError

    def banned_ids(self):
        return banned_ids_except(self.vocab_token_ids())

    def dataset_prompts(self, records, max_history, tokenizer, task_id, shots=()):
        raise NotImplementedError

    def input_prompt(self, item, tokenizer, max_history, task_id, where):
        raise NotImplementedError

    def output_text(self, tokenizer, ids, cleanup=True):
        raise NotImplementedError

    def chat_input(self, turns, where):
        """The input object of a conversation, [(role, text)] in order (serve.py's chat route):
        tasks whose input is a conversation say how it maps to their fields."""
        raise VLMError(f"{where}: task {self.name} does not take a conversation; "
                       "send its input to /v1/completions")

    def shot_ids(self, dataset_path, tokenizer, shots, seed):
        if shots:
            raise VLMError(f"--shots {shots}: few-shot prompting is for user tasks (--task_file); "
                           f"{self.name} is built in")
        return []

    # --- outputs and metrics ----------------------------------------------------------------------
    def write_outputs(self, prompts, outputs, output_dir):
        raise NotImplementedError

    def references(self, prompts):
        """Per prompt, the reference in the form this task's metrics read."""
        return [p.meta["reference"] for p in prompts]

    def read_outputs(self, path):
        """A system's outputs from a file as write_outputs writes them (score.py): one a line."""
        return text_lines(read_text(path, "hypotheses"))

    def read_references(self, path):
        """References, in the form `references` gives them, from a file as write_outputs writes
        them (`<task>_ref.txt`, score.py): one a line."""
        return text_lines(read_text(path, "references"))

    def metric_options(self):
        return {}

    def score(self, outputs, prompts):
        """{metric: value} of every scored metric the task names (teacher-forced ones aside)."""
        return self.score_references(outputs, self.references(prompts))

    def score_references(self, outputs, references):
        """score() of outputs and their references in the form `references` gives them: the one
        path from the metric registry to every figure evaluate.py and score.py report."""
        result = {}
        for name in self.metrics:
            metric = METRICS[name]
            if metric.score is not None:
                result.update(metric.score(outputs, references, **self.metric_options()))
        return result

    @property
    def teacher_forced(self):
        """Whether the task also reports the perplexity of its gold replies (dialogue)."""
        return any(METRICS[name].teacher_forced for name in self.metrics)

    # --- distillation -----------------------------------------------------------------------------
    def distilled_path(self, dataset_path):
        raise NotImplementedError

    def check_distilled(self, data, path, split):
        raise NotImplementedError

    def distillation_job(self, dataset_path, output_path, tokenizer, max_history, task_id,
                         dataset_cache=None):
        raise NotImplementedError

    def command_flags(self, task_file=None):
        """Flags a command line needs to name this task besides --task (a user task: its file)."""
        return ""

    # --- model ------------------------------------------------------------------------------------
    def vocab_token_ids(self):
        """Ids of the task's own embedding rows (its special tokens; none for a user task)."""
        return ()

    def checkpoint_meta(self):
        """Extra entries a checkpoint records for this task (a user task: its template)."""
        return {}

    # --- federated learning -----------------------------------------------------------------------
    def partition_key(self, record):
        """The label a non-IID split skews by (federated.py --partition dirichlet): a string per
        record of load_data's training split. Kinds without a natural one refuse."""
        raise VLMError(f"--partition dirichlet: task {self.name} has no key to skew its clients' data by; "
                       "use --partition iid")


@dataclass(frozen=True)
class BuiltinTask(TaskKind):
    """A task of the authors' table: its own special tokens, a dataset JSON file of splits."""
    name: str
    task_id: int                 # index of the task's adapter in a combined model
    special_tokens: tuple        # own tokens; the first two are always bos and eos
    splits: tuple                # splits read for training: (train split, validation split)
    test_split: str              # split decoded by evaluate.py
    default_dataset: str         # path in the authors' run.sh
    bottleneck: int              # adapter bottleneck used in the paper
    full_finetune: Hyper
    adapter: Hyper
    max_history: int = 2
    max_source_tokens: int = 0   # 0: no cut
    max_target_tokens: int = 0
    min_tokens: int = 0          # drop pairs with fewer tokens on either side (seq2seq only)
    metrics: tuple = ()          # names in tasks.metrics.METRICS
    slot_tokens: dict = field(default_factory=dict, hash=False)  # nlg: MR slot name -> special token

    record_keys = ()             # keys every record must have (checked in this order)
    distilled_key = DISTILLED_KEY

    @property
    def bos(self):
        return self.special_tokens[0]

    @property
    def eos(self):
        return self.special_tokens[1]

    def token_ids(self):
        """Ids of the task's own special tokens, in table order (bos, eos, ...)."""
        return [special_token_id(t) for t in self.special_tokens]

    def vocab_token_ids(self):
        return builtin_token_ids(self.name)

    def stop_ids(self):
        return tuple(self.token_ids())

    # --- records ----------------------------------------------------------------------------------
    def check_record(self, record, path, split, index):
        def fail(message):
            raise VLMError(f"{path}: split {split!r} record {index}: {message}")

        if not isinstance(record, dict):
            fail(f"expected an object, got {type(record).__name__}")
        for key in self.record_keys:
            if key not in record:
                fail(f"missing key {key!r}")
        self.check_fields(record, fail)

    def check_fields(self, record, fail):
        """Check the kind's fields of a record that has every key; `fail(message)` raises."""
        raise NotImplementedError

    def warn_about(self, rows, path, split):
        """Kind-specific warnings about a split's raw records (none by default)."""

    def keep_for_tokenizing(self, record):
        """The part of a raw record worth tokenizing (default: all of it)."""
        return record

    def check_dataset_path(self, path, shown=None):
        """A built-in task's dataset is a JSON file. `shown`: how errors name the flag and path."""
        if not os.path.isfile(path):
            raise VLMError(f"{shown or f'--dataset_path {path}'}: dataset file not found")

    def load_data(self, path, tokenizer, splits, cache_prefix=None):
        """{split: tokenized records} for the requested splits of the task's dataset file.

        Tokenized data is cached in `<cache_prefix>_<task>_<key>.json`, the key hashing the file's
        bytes, the tokenizer and the splits, so an edited file or another tokenizer never reuses it."""
        dataset, raw = read_json_file(path)
        records = {split: split_records(dataset, split, path) for split in splits}
        for split, rows in records.items():
            for index, record in enumerate(rows):
                self.check_record(record, path, split, index)
            self.warn_about(rows, path, split)
        key = hashlib.sha256(raw + tokenizer_fingerprint(tokenizer).encode()
                             + json.dumps([CACHE_VERSION, sorted(splits)]).encode()).hexdigest()[:20]
        cache_path = f"{cache_prefix}_{self.name}_{key}.json" if cache_prefix else None
        if cache_path and os.path.isfile(cache_path):
            logger.info("tokenized %s from cache %s", path, cache_path)
            cached, _ = read_json_file(cache_path, "cache")
            return cached
        check_unicode(records, path)
        try:  # both walk the records recursively: extra keys nested near JSON's own limit overflow them
            tokenized = tokenize_structure({s: [self.keep_for_tokenizing(r) for r in rows]
                                            for s, rows in records.items()}, tokenizer)
            if cache_path:
                write_json(cache_path, tokenized, indent=None)
        except RecursionError:
            raise VLMError(f"{path}: JSON nested too deeply") from None
        return tokenized

    # --- examples ---------------------------------------------------------------------------------
    def iter_contexts(self, records, max_history, target_key=None, rotate_persona=True, for_training=True):
        """Yield (context, target ids, record, utterance or None) for every example of a split."""
        raise NotImplementedError

    def build_inputs(self, context, reply, with_eos=True):
        """Token ids, segment ids and labels of one example in the authors' layout; labels are
        -100 everywhere but the reply (and its eos)."""
        raise NotImplementedError

    def training_examples(self, records, max_history, distillation=False, max_positions=None, where=""):
        """Examples (input_ids, token_type_ids, labels) of a split in the authors' layout; those
        longer than max_positions are dropped (and counted in a warning)."""
        target_key = self.distilled_key if distillation else None
        examples, too_long = [], 0
        for context, target, _, _ in self.iter_contexts(records, max_history, target_key):
            example = self.build_inputs(context, target)
            if max_positions and len(example["input_ids"]) > max_positions:
                too_long += 1
                continue
            examples.append(example)
        if too_long:
            logger.warning("%s: dropped %d examples longer than the model's %d positions", where, too_long,
                           max_positions)
        if not examples:
            raise VLMError(f"{where}: no usable examples")
        return examples

    # --- decoding ---------------------------------------------------------------------------------
    def make_prompt(self, context, task_id, meta=None):
        """The decoding prompt of one example: its input with an empty reply; the task's special
        tokens stop it and other tasks' special tokens are never generated."""
        example = self.build_inputs(context, [], with_eos=False)
        return Prompt(example["input_ids"], example["token_type_ids"], task_id, self.stop_ids(),
                      self.banned_ids(), dict(meta or {}))

    def prompt_meta(self, context, record, utterance, tokenizer):
        """What an evaluation prompt carries besides its reference (the scorers' ids, ...)."""
        return {}

    def dataset_prompts(self, records, max_history, tokenizer, task_id, shots=()):
        """One prompt per example of an evaluation split, with its reference. As the authors'
        evaluate.py: sources cut, targets whole, persona not rotated."""
        prompts = []
        for context, target, record, utterance in self.iter_contexts(records, max_history,
                                                                     rotate_persona=False,
                                                                     for_training=False):
            meta = {"reference": decode_text(tokenizer, target)}
            meta.update(self.prompt_meta(context, record, utterance, tokenizer))
            prompts.append(self.make_prompt(context, task_id, meta))
        return prompts

    def text_input(self, text, where):
        """The JSON object a plain-text --input stands for."""
        return {"src": text}

    def input_context(self, item, encode, get, max_history, where):
        """The context of a user's input object; encode(text) -> ids, get(key, type) -> the checked value."""
        raise NotImplementedError

    def input_prompt(self, item, tokenizer, max_history, task_id, where):
        """A prompt from a user's own input: a string, or a JSON object with the task's fields."""
        def encode(text):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a JSON \\u escape: no tokenizer takes it
                raise VLMError(f"{where}: {text[:40]!r} is not valid Unicode text") from None
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        if isinstance(item, str):
            item = self.text_input(item, where)
        if not isinstance(item, dict):
            raise VLMError(f"{where}: expected a string or a JSON object")

        def get(key, kind):
            value = item.get(key)
            if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
                raise VLMError(f"{where}: {key!r} must be a "
                               f"{'list of strings' if kind is list else kind.__name__}")
            return value

        context = self.input_context(item, encode, get, max_history, where)
        return self.make_prompt(context, task_id, {"input": where})  # `where` names it in decoding errors

    def output_text(self, tokenizer, ids, cleanup=True):
        return decode_text(tokenizer, ids, cleanup)

    # --- outputs ----------------------------------------------------------------------------------
    def output_path(self, output_dir, name):
        return os.path.join(output_dir, f"{self.name}_{name}")

    def write_outputs(self, prompts, outputs, output_dir):
        """The files the authors wrote: `<task>_output.txt` and `<task>_ref.txt`, one a line."""
        write_lines(self.output_path(output_dir, "output.txt"), outputs)
        write_lines(self.output_path(output_dir, "ref.txt"), self.references(prompts))

    # --- distillation -----------------------------------------------------------------------------
    def distilled_path(self, dataset_path):
        """`data/x.json` -> `data/x.distilled.json`: where the distiller writes and train.py looks."""
        return os.path.splitext(dataset_path)[0] + DISTILLED_SUFFIX

    def distilled_holders(self, record):
        """The parts of a record that carry a distilled target (the record; dialogue: its utterances)."""
        return [record]

    def check_distilled(self, records, path, split):
        """--distillation reads the distilled targets; say which record lacks them (not a KeyError)."""
        for index, record in enumerate(records):
            for holder in self.distilled_holders(record):
                if self.distilled_key not in holder:
                    raise VLMError(f"{path}: split {split!r} record {index}: --distillation needs "
                                   f"{self.distilled_key!r}, which this record lacks")
                if not holder[self.distilled_key]:
                    self.empty_distilled(path, split, index)

    def empty_distilled(self, path, split, index):
        """An empty distilled target: allowed (an empty string still teaches eos)."""

    def check_distill_output(self, dataset_path, output_path):
        """The user's dataset is never overwritten: refuse an --output that is the dataset file."""
        if not os.path.isfile(dataset_path):
            raise VLMError(f"--dataset_path {dataset_path}: dataset file not found")
        same = os.path.realpath(output_path) == os.path.realpath(dataset_path) or (
            os.path.exists(output_path) and os.path.samefile(output_path, dataset_path))
        if same:
            raise VLMError(f"--output {output_path}: is the dataset file itself; the distilled copy needs "
                           f"another name (default: {self.distilled_path(dataset_path)})")
        if os.path.isdir(output_path):
            raise VLMError(f"--output {output_path}: is a folder; give a file name")

    def example_positions(self, records):
        """(record index, utterance index or None) of every training example, in iter_contexts' order."""
        return [(i, None) for i in range(len(records))]

    def attach_target(self, records, position, text):
        i, _ = position
        records[i][DISTILLED_KEY] = text

    def distillation_job(self, dataset_path, output_path, tokenizer, max_history, task_id,
                         dataset_cache=None):
        """One prompt per training example: every record (every utterance for dialogue/qa).

        The contexts are training's (persona rotated per utterance, sources cut as training cuts them).
        for_training=False only keeps the seq2seq pairs training drops for being under `min_tokens`
        (and skips the target cut, which touches no prompt): the distilled copy has a target for
        every record, as the authors' distiller did. The copy holds the raw decoded texts: train.py
        re-tokenizes them, and raw text gives back the teacher's own tokens."""
        self.check_distill_output(dataset_path, output_path)
        train_split = self.splits[0]
        dataset, raw = read_json_file(dataset_path)
        raw_records = split_records(dataset, train_split, dataset_path)
        records = self.load_data(dataset_path, tokenizer, [train_split], dataset_cache)[train_split]
        positions = self.example_positions(raw_records)
        # index: the example's own sampling seed
        prompts = [self.make_prompt(context, task_id, {"index": index})
                   for index, (context, _, _, _) in enumerate(self.iter_contexts(records, max_history,
                                                                                  for_training=False))]
        if len(prompts) != len(positions):  # iter_contexts yields every record and utterance here
            raise RuntimeError(f"{len(prompts)} prompts for {len(positions)} training examples")

        def write(output, texts):
            copy = json.loads(json.dumps(raw_records))  # deep copy; the caller's data stays as read
            for position, text in zip(positions, texts):
                self.attach_target(copy, position, text)
            distilled = dict(dataset)  # only the train records change: validation stays gold
            distilled[train_split] = copy
            write_json(output, distilled, indent=None)

        return DistillationJob(prompts, raw, write)
