"""Shared fixtures: a small random GPT-2 saved as a local folder (the hub is never contacted)
and the real GPT-2 tokenizer shipped in data/gpt2-tokenizer."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

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


def run_script(*args, stdin=None, cwd=REPO, timeout=600):
    """Run one of the repo's scripts as a user would; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, *args], cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)
