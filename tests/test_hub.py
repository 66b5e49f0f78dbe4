"""--model_checkpoint with a hub name: from the local Hugging Face cache without the hub, from the
hub when it answers, and otherwise one error line within seconds that says how to get the
weights (Hugging Face's client alone retries an unreachable hub for half a minute or more)."""
import http.server
import threading
import time

import pytest
from conftest import run_script, tiny_gpt2
from huggingface_hub import constants

from models import vlm
from utils import hub
from utils.errors import VLMError

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused
PROXIES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def run_without_hub(monkeypatch, tmp_path, *args):
    """(CompletedProcess, seconds) of a script on a machine whose hub cannot be reached: online
    mode, an empty cache, no proxy."""
    for name in ("HF_HUB_OFFLINE", *PROXIES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    start = time.monotonic()
    done = run_script(*args, timeout=120)
    return done, time.monotonic() - start


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_hub_name_without_hub_fails_fast_with_a_way_to_get_the_weights(monkeypatch, tmp_path, script):
    extra = (["--task", "nlg", "--dataset_path", "data/samples/nlg.json",
              "--output_dir", str(tmp_path / "out"), "--dataset_cache", str(tmp_path / "cache")]
             if script == "train.py"
             else ["--task", "nlg", "--no_sample", "--input", "name[The Vaults]"])
    done, seconds = run_without_hub(monkeypatch, tmp_path, script, "--model_checkpoint", "gpt2",
                                    "--device", "cpu", *extra)
    assert done.returncode == 2
    # a hub that retries with back-off takes minutes; 30 s leaves room for a loaded machine (two test workers)
    assert seconds < 30, f"took {seconds:.1f} s"
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: --model_checkpoint gpt2: no such local folder")
    assert f"the Hugging Face hub {UNREACHABLE} cannot be reached (connection refused)" in lines[0]
    assert "`hf download gpt2 --local-dir gpt2`" in lines[0] and lines[0].endswith("--model_checkpoint gpt2")
    assert not (tmp_path / "out").exists()


def test_hub_name_loads_from_the_local_cache_without_the_hub(monkeypatch, tmp_path):
    """The layout huggingface_hub writes: models--gpt2/refs/main -> snapshots/<commit>/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_cache" / "models--gpt2"
    tiny_gpt2(seed=3).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("from models.vlm import load_backbone; from utils.hub import check_model_source; "
            "print(check_model_source('gpt2'), load_backbone('gpt2').config.n_layer)")
    done, _ = run_without_hub(monkeypatch, tmp_path, "-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cache", "2"]


class _Hub(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(404)  # any answer means the hub is there
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def local_hub(monkeypatch):
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()
    server.server_close()


class FakeModel:
    calls = []

    @classmethod
    def from_pretrained(cls, name, **kwargs):
        cls.calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise OSError("not in the cache")
        return "downloaded"


def test_hub_name_downloads_when_the_hub_answers(local_hub, monkeypatch):
    monkeypatch.setattr(FakeModel, "calls", [])
    monkeypatch.setattr(hub, "in_local_cache", lambda name: False)
    assert hub.hub_unreachable() is None
    assert hub.check_model_source("gpt2") == "hub"
    assert vlm.from_pretrained(FakeModel, "gpt2", dtype=None) == "downloaded"
    assert FakeModel.calls == [{"local_files_only": True, "dtype": None}, {"dtype": None}]


def test_unreachable_or_offline_hub_is_one_error(monkeypatch):
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(FakeModel, "calls", [])
    with pytest.raises(VLMError, match=r"cannot be reached \(connection refused\)"):
        vlm.from_pretrained(FakeModel, "gpt2-medium")
    assert FakeModel.calls == [{"local_files_only": True}]  # the hub was never asked for the files
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(VLMError, match=r"offline mode is on \(HF_HUB_OFFLINE\)\. Download it where"):
        hub.require_hub("gpt2-medium")
