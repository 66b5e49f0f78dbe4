"""The one table of task definitions. Everything task-specific is read from here.

Special tokens are added to GPT-2's 50,257-token vocabulary in one fixed order, so every
checkpoint of every task gives each token the same id (`<pad>`=50257 ... `<response>`=50286).
"""
from dataclasses import dataclass, field

from utils.errors import VLMError
from utils.vocab import (ALL_SPECIAL_TOKENS, BUILTIN_TASK_TOKENS, GPT2_VOCAB_SIZE, PAD_TOKEN,  # noqa: F401
                         builtin_token_ids, special_token_id)


@dataclass(frozen=True)
class Hyper:
    """Batch size x accumulation, epochs and learning rate of the authors' run.sh."""
    train_batch_size: int
    gradient_accumulation_steps: int
    n_epochs: int
    lr: float


@dataclass(frozen=True)
class Task:
    name: str
    task_id: int                 # index of the task's adapter in a combined model
    layout: str                  # "seq2seq" | "nlg" | "dialogue": which input builder
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
    metrics: tuple = ()          # names in engines.evaluation.SCORERS (+ "ppl": teacher-forced)
    slot_tokens: dict = field(default_factory=dict)  # nlg: MR slot name -> special token

    @property
    def bos(self):
        return self.special_tokens[0]

    @property
    def eos(self):
        return self.special_tokens[1]


TASKS = {
    "dialogue": Task(
        name="dialogue", task_id=0, layout="dialogue",
        special_tokens=("<bos_dial>", "<eos_dial>", "<speaker1>", "<speaker2>", "<persona>"),
        splits=("train", "valid"), test_split="valid",
        default_dataset="data/persona/data.json", bottleneck=100,
        full_finetune=Hyper(8, 2, 3, 6.25e-5), adapter=Hyper(8, 2, 3, 1e-3),
        metrics=("bleu", "f1", "ppl"),
    ),
    "qa": Task(
        name="qa", task_id=1, layout="dialogue",
        special_tokens=("<bos_qa>", "<eos_qa>", "<question>", "<answer>", "<document>"),
        splits=("train", "valid"), test_split="valid",
        default_dataset="data/CoQA/data.json", bottleneck=300,
        full_finetune=Hyper(2, 8, 3, 6.25e-5), adapter=Hyper(2, 8, 5, 5e-4),
        max_history=1, max_source_tokens=400,  # the story is cut to 400 tokens
        metrics=("coqa",),
    ),
    "mt": Task(
        name="mt", task_id=2, layout="seq2seq",
        special_tokens=("<bos_mt>", "<eos_mt>", "<source_mt>", "<target_mt>"),
        splits=("train", "test"), test_split="test",  # the authors validate mt on its test split
        default_dataset="data/NMT/data_en_ge.json", bottleneck=300,
        full_finetune=Hyper(8, 4, 8, 6.25e-5), adapter=Hyper(8, 4, 8, 5e-4),
        max_source_tokens=100, max_target_tokens=100, min_tokens=2,
        metrics=("bleu", "sacrebleu", "rouge"),
    ),
    "summarization": Task(
        name="summarization", task_id=3, layout="seq2seq",
        special_tokens=("<bos_sm>", "<eos_sm>", "<source_sm>", "<target_sm>"),
        splits=("train", "valid"), test_split="test",
        default_dataset="data/CNNDAILY/data.json", bottleneck=100,
        full_finetune=Hyper(4, 8, 10, 8e-5), adapter=Hyper(4, 8, 10, 5e-4),
        max_source_tokens=400, max_target_tokens=130, min_tokens=2,
        metrics=("bleu", "rouge"),
    ),
    "nlg": Task(
        name="nlg", task_id=4, layout="nlg",
        special_tokens=("<bos_nlg>", "<eos_nlg>", "<name>", "<eatType>", "<familyFriendly>",
                        "<priceRange>", "<food>", "<near>", "<area>", "<customerRating>", "<response>"),
        splits=("train", "valid"), test_split="test",
        default_dataset="data/NLG/data.json", bottleneck=10,
        full_finetune=Hyper(8, 4, 10, 5e-5), adapter=Hyper(8, 4, 10, 5e-3),
        metrics=("e2e",),
        slot_tokens={"name": "<name>", "eatType": "<eatType>", "familyFriendly": "<familyFriendly>",
                     "priceRange": "<priceRange>", "food": "<food>", "near": "<near>",
                     "area": "<area>", "customer rating": "<customerRating>"},
    ),
}

# The added tokens (utils/vocab.py) are exactly the tasks' own, in the authors' order.
assert {name: task.special_tokens for name, task in TASKS.items()} == BUILTIN_TASK_TOKENS
TASK_BY_ID = {task.task_id: task for task in TASKS.values()}


def get_task(name, user_tasks=None):
    """A built-in task, or a user task of `user_tasks` ({name: TemplateTask} of --task_file)."""
    if name in TASKS:
        return TASKS[name]
    if user_tasks and name in user_tasks:
        return user_tasks[name]
    known = list(TASKS) + list(user_tasks or {})
    hint = "" if user_tasks else " (a user task needs --task_file FILE)"
    raise VLMError(f"--task: unknown task {name!r}; choose one of {', '.join(known)}{hint}")


def task_token_ids(task):
    """Ids of the task's own special tokens, in table order (bos, eos, ...)."""
    return [special_token_id(t) for t in task.special_tokens]


def banned_token_ids(task):
    """Added tokens a task never generates: `<pad>` and every other task's special tokens.

    The authors masked other tasks' tokens when decoding with the combined model; evaluate.py
    applies the same mask, so a single-task checkpoint and the combined model decode alike."""
    own = set(task_token_ids(task))
    return tuple(i for i in range(GPT2_VOCAB_SIZE, GPT2_VOCAB_SIZE + len(ALL_SPECIAL_TOKENS)) if i not in own)


def parse_dataset_paths(items, user_tasks=None):
    """`--dataset_paths mt=PATH nlg=PATH` -> {task: path}; malformed, unknown or repeated tasks fail.
    A user task's path is its folder of train/valid/test.jsonl."""
    paths, known = {}, list(TASKS) + list(user_tasks or {})
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise VLMError(f"--dataset_paths {item}: expected TASK=PATH, e.g. mt=data/NMT/data_en_ge.json")
        if name not in known:
            raise VLMError(f"--dataset_paths {item}: unknown task {name!r}; choose one of {', '.join(known)}")
        if name in paths:
            raise VLMError(f"--dataset_paths: {name} is given twice")
        paths[name] = path
    return paths
