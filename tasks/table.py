"""The table of built-in tasks: each one a kind of task (tasks/seq2seq.py, nlg.py, dialogue.py,
qa.py) with the authors' settings. A user task comes from a task file instead (tasks/task_file.py).

Special tokens are added to GPT-2's 50,257-token vocabulary in one fixed order, so every
checkpoint of every task gives each token the same id (`<pad>`=50257 ... `<response>`=50286).
To add a built-in task of an existing kind, add an entry here and its tokens in utils/vocab.py.
"""
from tasks.base import Hyper
from tasks.dialogue import DialogueTask
from tasks.nlg import NLGTask
from tasks.qa import QATask
from tasks.seq2seq import Seq2SeqTask
from utils.errors import VLMError
from utils.vocab import BUILTIN_TASK_TOKENS

TASKS = {
    "dialogue": DialogueTask(
        name="dialogue", task_id=0,
        special_tokens=("<bos_dial>", "<eos_dial>", "<speaker1>", "<speaker2>", "<persona>"),
        splits=("train", "valid"), test_split="valid",
        default_dataset="data/persona/data.json", bottleneck=100,
        full_finetune=Hyper(8, 2, 3, 6.25e-5), adapter=Hyper(8, 2, 3, 1e-3),
        metrics=("bleu", "f1", "ppl"),
    ),
    "qa": QATask(
        name="qa", task_id=1,
        special_tokens=("<bos_qa>", "<eos_qa>", "<question>", "<answer>", "<document>"),
        splits=("train", "valid"), test_split="valid",
        default_dataset="data/CoQA/data.json", bottleneck=300,
        full_finetune=Hyper(2, 8, 3, 6.25e-5), adapter=Hyper(2, 8, 5, 5e-4),
        max_history=1, max_source_tokens=400,  # the story is cut to 400 tokens
        metrics=("coqa",),
    ),
    "mt": Seq2SeqTask(
        name="mt", task_id=2,
        special_tokens=("<bos_mt>", "<eos_mt>", "<source_mt>", "<target_mt>"),
        splits=("train", "test"), test_split="test",  # the authors validate mt on its test split
        default_dataset="data/NMT/data_en_ge.json", bottleneck=300,
        full_finetune=Hyper(8, 4, 8, 6.25e-5), adapter=Hyper(8, 4, 8, 5e-4),
        max_source_tokens=100, max_target_tokens=100, min_tokens=2,
        metrics=("bleu", "sacrebleu", "rouge"),
    ),
    "summarization": Seq2SeqTask(
        name="summarization", task_id=3,
        special_tokens=("<bos_sm>", "<eos_sm>", "<source_sm>", "<target_sm>"),
        splits=("train", "valid"), test_split="test",
        default_dataset="data/CNNDAILY/data.json", bottleneck=100,
        full_finetune=Hyper(4, 8, 10, 8e-5), adapter=Hyper(4, 8, 10, 5e-4),
        max_source_tokens=400, max_target_tokens=130, min_tokens=2,
        metrics=("bleu", "rouge"),
    ),
    "nlg": NLGTask(
        name="nlg", task_id=4,
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
