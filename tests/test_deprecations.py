"""The next deprecation in transformers, safetensors or torch fails a test instead of reaching a
user: pytest.ini turns their FutureWarning/DeprecationWarning into errors, conftest.py fails a test
on a deprecation that transformers only logs, and our own calls use the current API."""
import os
import shutil
import subprocess
import sys

import torch
from conftest import REPO, run_script, tiny_gpt2

from models.vlm import VersatileLM

PROBES = '''
import logging, warnings
import torch
from transformers.utils import logging as hf_logging
from conftest import tiny_gpt2


def test_old_cache_argument():
    gpt2 = tiny_gpt2()
    gpt2(torch.tensor([[1, 2, 3]]), past_key_values=None)


def test_logged_deprecation():
    hf_logging.get_logger("transformers.modeling_utils").warning("`foo` is deprecated; use `bar`")


def test_library_future_warning():
    import transformers.utils.generic as module
    warnings.warn_explicit("a future change", FutureWarning, module.__file__, 1, module=module.__name__)


def test_logged_message_that_is_no_deprecation():
    hf_logging.get_logger("transformers.modeling_utils").warning("something else")
'''


def test_pytest_configuration_fails_tests_on_library_deprecations(tmp_path):
    """The repo's pytest.ini and conftest.py, on probes doing what a future deprecation does."""
    shutil.copy(f"{REPO}/pytest.ini", tmp_path / "pytest.ini")
    (tmp_path / "tests").mkdir()
    shutil.copy(f"{REPO}/tests/conftest.py", tmp_path / "tests" / "conftest.py")
    (tmp_path / "tests" / "test_probes.py").write_text(PROBES)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-n", "0", "tests"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=f"{tmp_path}/tests", HF_HUB_OFFLINE="1"))
    out = done.stdout
    assert "FAILED tests/test_probes.py::test_old_cache_argument" in out
    assert "`past_key_values` is deprecated" in out
    assert "transformers logged a deprecation: `foo` is deprecated; use `bar`" in out
    assert "FAILED tests/test_probes.py::test_library_future_warning" in out
    assert "PASSED tests/test_probes.py::test_logged_message_that_is_no_deprecation" in out
    assert done.returncode == 1


def test_decoding_and_training_forwards_use_the_current_cache_api():
    """A cache only where decoding asks for one, passed and returned as `cache`."""
    model = VersatileLM(tiny_gpt2()).eval()
    ids = torch.tensor([[5, 6, 7]])
    assert model(ids).cache is None                   # GPT-2's config says use_cache=True: not here
    first = model(ids, use_cache=True)
    assert first.cache.get_seq_length() == 3
    second = model(torch.tensor([[8]]), cache=first.cache, use_cache=True)
    assert second.cache.get_seq_length() == 4
    whole = model(torch.tensor([[5, 6, 7, 8]])).logits[:, -1]
    torch.testing.assert_close(second.logits[:, -1], whole)
    hidden, _ = model.labelled_hidden(ids, torch.tensor([[-100, 6, 7]]))
    assert hidden.shape == (2, model.config.n_embd)


def test_scripts_print_no_deprecation(tiny_base, tmp_path):
    """run_script fails a test on a deprecation on the script's stderr; a decoding run passes it."""
    done = run_script("evaluate.py", "--task", "nlg", "--model_checkpoint", tiny_base, "--device", "cpu",
                      "--no_sample", "--max_length", "3", "--input", "name[The Vaults]")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
