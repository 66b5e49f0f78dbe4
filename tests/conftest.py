"""Shared fixtures: a small random GPT-2 saved as a local folder (the hub is never contacted)
and the real GPT-2 tokenizer shipped in data/gpt2-tokenizer. Deprecations fail tests: warnings
through pytest.ini, transformers' logged ones through `no_logged_deprecations`, and those of the
scripts run_script starts through its check of their stderr."""
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

# One thread per process, here and in every script a test starts (they inherit the variable): the
# tests' models are tiny, so a second thread gains little, while two processes side by side, or
# another job on this 2-core machine, leave OpenMP threads spinning for each other, which slows
# small operations down tenfold and more. Results do not depend on it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = dict(n_layer=2, n_embd=64, n_head=4, n_positions=512)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**TINY_CONFIG)).eval()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Folder of a small random GPT-2 (50,257 tokens), usable as --model_checkpoint."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tiny_gpt2().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    from utils.data import load_tokenizer
    return load_tokenizer()


# What a deprecation notice looks like on stderr: Python's warning line or a library's own message.
DEPRECATION_TEXT = re.compile(r"(Future|Deprecation)Warning|\bdeprecat", re.IGNORECASE)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_logged_deprecations():
    """Fail the test when transformers' logger reports a deprecation during it: transformers
    announces some (`past_key_values`/`cache_params` are deprecated. Use `cache` instead.) with
    logger.warning_once, not the warnings module, so pytest.ini's filters never see them.
    The handler sits on the library's root logger, which keeps its records to itself."""
    handler = _Records()
    library = logging.getLogger("transformers")
    library.addHandler(handler)
    try:
        yield
    finally:
        library.removeHandler(handler)
    found = [r.getMessage() for r in handler.records if DEPRECATION_TEXT.search(r.getMessage())]
    if found:
        pytest.fail(f"transformers logged a deprecation: {found[0]}", pytrace=False)


def popen_script(script, argv, log):
    """Start one of the repo's scripts in the background (stderr to `log`), for tests that kill it.
    One torch thread in every run: the same float sums, so runs compare bit for bit."""
    env = dict(os.environ, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, script, *argv], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))


def sigkill_after_first_checkpoint(victim, run_folder, log, timeout):
    """Wait (at most `timeout` s, the victim alive) until run_folder/checkpoint_epoch1/ exists,
    then SIGKILL the victim; a victim still running after a failed wait is killed anyway."""
    try:
        deadline = time.time() + timeout
        while not (run_folder / "checkpoint_epoch1").is_dir():
            assert victim.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(30) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()


def run_script(*args, stdin=None, cwd=REPO, timeout=600, env=None):
    """Run one of the repo's scripts as a user would; returns the CompletedProcess. `env`: extra
    variables. A deprecation warning on its stderr fails the test (the script's user would see it)."""
    env = dict(os.environ, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", **(env or {}))
    done = subprocess.run([sys.executable, *args], cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)
    deprecation = DEPRECATION_TEXT.search(done.stderr or "")
    assert deprecation is None, f"{args[0]} printed a deprecation warning:\n{done.stderr[-2000:]}"
    return done


# Every registered method at a small size, so the tiny GPT-2 trains each in a second or two.
TINY_METHOD_OPTIONS = {
    "adapter": {"bottleneck": 4}, "houlsby": {"bottleneck": 4}, "parallel": {"bottleneck": 4},
    "lora": {"r": 2, "targets": ["q", "v", "mlp_fc"]}, "prefix": {"length": 3, "hidden": 16},
    "prompt": {"length": 4}, "ptuning": {"length": 3, "hidden": 16}, "ln": {}, "adapterbias": {},
    "compacter": {"bottleneck": 8}, "krona": {},
    "unipelt": {"lora_r": 2, "prefix_length": 2, "prefix_hidden": 16, "bottleneck": 4}}


# Every registered method in two compositions: a task composes any methods but two that add virtual
# tokens (prompt, ptuning) or two that add prefixes (prefix, unipelt). (Spelled out: conftest.py
# imports nothing of the repo, so test_deprecations can run it alone; tests check both against the registry.)
EVERY_METHOD_SPECS = ("adapter+houlsby+parallel+lora+prefix+prompt+ln+adapterbias+compacter+krona",
                      "ptuning+unipelt")


def tiny_method_options(spec, **changes):
    """{method: options} of a `+`-joined spec at the small sizes; changes: {method: {option: value}}.
    A name that is no method gets no options, so the scripts' own error for it shows."""
    return {name: {**TINY_METHOD_OPTIONS.get(name, {}), **changes.get(name, {})} for name in spec.split("+")}


def option_flags(methods):
    """The scripts' option flags for {method: options}: --<method>_<option> VALUE each."""
    flags = []
    for name, options in methods.items():
        for option, value in options.items():
            flags += [f"--{name}_{option}", ",".join(value) if isinstance(value, list) else str(value)]
    return flags


def method_flags(methods):
    """train.py's flags for {method: options}: --method and each option's flag."""
    return ["--method", "+".join(methods), *option_flags(methods)]
