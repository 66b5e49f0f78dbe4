"""score.py's engine: a task's metrics for any system's outputs, read from files.

The task reads the files (`read_outputs`, `read_references`: the formats its official scorer and
evaluate.py's files use) and scores them with `score_references`, the code path evaluate.py's
figures come from, so both give the same numbers for the same outputs.
"""
import os

from tasks.table import get_task
from tasks.task_file import load_task_file
from utils.errors import VLMError
from utils.io import write_json


def scoring_task(name, task_file=None):
    """A built-in task, or a user task of the task file."""
    return get_task(name, load_task_file(task_file) if task_file else None)


def _check_file(flag, path):
    if os.path.isdir(path):
        raise VLMError(f"{flag} {path}: is a folder; give a file")
    if not os.path.isfile(path):
        raise VLMError(f"{flag} {path}: file not found")


def score_files(task, hypotheses, references, output=None):
    """{"task", "examples", metric: value, ...} of the hypotheses file against the references file;
    `output`: also write them there as JSON (to a temporary file, then renamed)."""
    _check_file("--hypotheses", hypotheses)
    _check_file("--references", references)
    if output and os.path.isdir(output):  # said before scoring, which can take a minute
        raise VLMError(f"--output {output}: is a folder; give a file name")
    outputs = task.read_outputs(hypotheses)
    golds = task.read_references(references)
    if len(outputs) != len(golds):
        raise VLMError(f"{len(outputs)} hypotheses in {hypotheses} but {len(golds)} references in "
                       f"{references}; they must pair up one to one, in order")
    result = {"task": task.name, "examples": len(outputs)}
    try:
        result.update(task.score_references(outputs, golds))
    except VLMError as error:  # a reference the metric cannot read (e.g. intent_slot's)
        raise VLMError(f"{references}: {error}") from None
    if output:
        write_json(output, result)
    return result
