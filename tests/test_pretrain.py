"""pretrain.py: a few steps lower the loss and leave a GPT-2 folder the other scripts load; the
text stream packs, shuffles and resumes exactly; a SIGKILLed run resumed ends with the same
weights; two torchrun processes train what one process trains; bad input is one error line."""
import json
import lzma
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_script
from safetensors.torch import load_file

from utils.corpus import BlockStream, validation_blocks
from utils.data import load_tokenizer

FIXTURES = os.path.join(REPO, "tests", "fixtures", "pretrain")
WIKI = os.path.join(FIXTURES, "wikipedia_en.txt")
GERMAN = os.path.join(FIXTURES, "eltec_de.txt.xz")
VALID = os.path.join(FIXTURES, "valid_en.txt")


def pretrain_argv(out, *extra, steps=12, interval=4):
    return ["pretrain.py", "--train_files", WIKI, GERMAN, "--valid_files", VALID, "--valid_tokens", "1024",
            "--block_size", "64", "--batch_size", "4", "--max_steps", str(steps),
            "--eval_interval", str(interval),
            "--warmup_steps", "2", "--lr", "1e-2", "--n_layer", "2", "--n_embd", "32", "--n_head", "2",
            "--n_positions", "128", "--shuffle_blocks", "16", "--device", "cpu", "--output_dir", str(out),
            *extra]


def env():
    return dict(os.environ, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                OMP_NUM_THREADS="1")


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    result = subprocess.run([sys.executable, *pretrain_argv(out)], cwd=REPO, env=env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    from engines.pretrain import load_tokenizer as plain
    return plain()


# --- the stream ----------------------------------------------------------------------------------
def test_stream_packs_every_token_of_one_file_in_order_without_shuffling(gpt2_tokenizer):
    stream = BlockStream([WIKI], gpt2_tokenizer, block_size=50, shuffle_blocks=1)
    with open(WIKI, encoding="utf-8") as f:
        text = f.read()
    expected = gpt2_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    blocks = [next(stream) for _ in range(len(expected) // 50 - 10)]
    got = [t for b in blocks for t in b]
    # Chunks of 256 lines are tokenized apart, so a token may split where two chunks meet; this
    # 30 KB file is one chunk, so the stream is the file's tokens exactly.
    assert got == expected[:len(got)]
    assert all(len(b) == 50 for b in blocks)


def test_stream_mixes_files_by_weight_and_wraps_around(gpt2_tokenizer):
    stream = BlockStream([WIKI + ":1", GERMAN + ":3"], gpt2_tokenizer, block_size=32, shuffle_blocks=4)
    assert stream.weights == [0.25, 0.75]
    for _ in range(600):  # more tokens than both files hold: each starts again
        next(stream)
    passes = stream.passes()
    assert passes[WIKI] >= 1 and passes[GERMAN] >= 1
    # memory stays bounded: the shuffle buffer, one chunk's blocks and less than a block of tokens
    assert len(stream.buffer) < 4 and len(stream.ready) < 200 and len(stream.pending) < 32


def test_stream_state_restores_the_exact_continuation(gpt2_tokenizer):
    first = BlockStream([WIKI, GERMAN], gpt2_tokenizer, block_size=40, seed=7, shuffle_blocks=8)
    for _ in range(25):
        next(first)
    state, tensors = first.state()
    json.dumps(state)  # JSON-ready
    expected = [next(first) for _ in range(60)]
    second = BlockStream([WIKI, GERMAN], gpt2_tokenizer, block_size=40, seed=999, shuffle_blocks=8)
    second.restore(state, tensors)
    assert [next(second) for _ in range(60)] == expected


def test_shuffle_buffer_reorders_blocks_deterministically(gpt2_tokenizer):
    ordered = BlockStream([WIKI], gpt2_tokenizer, block_size=16, shuffle_blocks=1)
    plain = [next(ordered) for _ in range(100)]
    s1 = BlockStream([WIKI], gpt2_tokenizer, block_size=16, seed=1, shuffle_blocks=32)
    s2 = BlockStream([WIKI], gpt2_tokenizer, block_size=16, seed=1, shuffle_blocks=32)
    shuffled = [next(s1) for _ in range(60)]
    assert shuffled == [next(s2) for _ in range(60)]
    assert shuffled != plain[:60]
    assert all(block in plain for block in shuffled)  # the same blocks, in another order


def test_validation_blocks_take_the_first_tokens_of_the_file(gpt2_tokenizer):
    blocks = validation_blocks(VALID, gpt2_tokenizer, 64, 300)
    assert blocks.shape == (4, 64)
    with open(VALID, encoding="utf-8") as f:
        expected = gpt2_tokenizer(f.read(), add_special_tokens=False, verbose=False)["input_ids"][:256]
    assert blocks.flatten().tolist() == expected


# --- the run ---------------------------------------------------------------------------------------
def test_pretraining_lowers_the_loss_and_writes_a_gpt2_folder(pretrained):
    out, result = pretrained
    records = read_metrics(out)
    assert [r["step"] for r in records] == [4, 8, 12]
    assert [r["tokens"] for r in records] == [4 * 4 * 63 * s for s in (1, 2, 3)]
    first, last = records[0]["valid"]["valid_en"]["nll"], records[-1]["valid"]["valid_en"]["nll"]
    # ln(50257) = 10.8 at init. Measured with seeds 0 and 1: 10.29 -> 9.42 and 10.25 -> 9.42 from
    # step 4 to 12 (0.8+ nats); the bounds leave room for noise.
    assert last < 9.8 and last < first - 0.5
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "tensorboard"):
        assert os.path.exists(os.path.join(out, name)), name
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "2 layers, 32 wide, 2 heads, 128 positions" in card and "| steps | 12 |" in card
    assert f"| tokens seen | {records[-1]['tokens']:,} |" in card and "pretrain.py --train_files" in card
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(str(out))
    assert model.config.vocab_size == 50257 and model.config.n_embd == 32


def test_the_pretrained_folder_is_a_backbone_for_adapter_training(pretrained, tmp_path):
    out, _ = pretrained
    result = run_script("train.py", "--task", "nlg", "--dataset_path", "data/samples/nlg.json",
                        "--dataset_cache", "",
                        "--model_checkpoint", str(out), "--adapter_bottleneck", "4", "--n_epochs", "1",
                        "--train_batch_size", "32", "--device", "cpu", "--output_dir", str(tmp_path / "nlg"))
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_script("evaluate.py", "--task", "nlg", "--no_sample", "--max_length", "5",
                        "--model_checkpoint", str(tmp_path / "nlg"),
                        "--dataset_path", "data/samples/nlg.json", "--dataset_cache", "",
                        "--output_dir", str(tmp_path / "results"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.isfile(tmp_path / "results" / "nlg_metrics.json")


def test_continued_pretraining_starts_from_the_given_folder(pretrained, tmp_path):
    out, _ = pretrained
    argv = pretrain_argv(tmp_path / "more", "--model_checkpoint", str(out), steps=4, interval=4)
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env=env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    before = read_metrics(out)[-1]["valid"]["valid_en"]["nll"]
    after = read_metrics(tmp_path / "more")[-1]["valid"]["valid_en"]["nll"]
    assert after < before + 0.3  # it continued from trained weights, far below a random model's ~10.8


def checkpoint_iteration(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))["engine"]["iteration"]
    except (OSError, ValueError):  # between the swap of two checkpoint folders
        return 0


def test_resume_after_sigkill_gives_identical_weights(tmp_path):
    whole = tmp_path / "whole"
    flags = ("--dropout", "0.1")  # dropout on: equal weights need the random state restored too
    result = subprocess.run([sys.executable, *pretrain_argv(whole, *flags, steps=24)], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, *pretrain_argv(killed, *flags, steps=24)], cwd=REPO,
                               env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoint" / "training_state.json"
    deadline = time.time() + 240
    while time.time() < deadline and checkpoint_iteration(state) < 8:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state.exists() and not (killed / "model.safetensors").exists()  # killed before the end
    result = subprocess.run([sys.executable, *pretrain_argv(killed, *flags, "--resume", steps=24)], cwd=REPO,
                            env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["valid"] for r in read_metrics(whole)] == [r["valid"] for r in read_metrics(killed)]


def test_two_processes_train_what_one_process_trains(tmp_path):
    one = tmp_path / "one"
    result = subprocess.run([sys.executable, *pretrain_argv(one, "--batch_size", "4", steps=4, interval=2)],
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *pretrain_argv(two, "--batch_size", "2", steps=4, interval=2)]
    result = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-5, msg=name)
    first, second = read_metrics(one), read_metrics(two)
    assert [r["tokens"] for r in first] == [r["tokens"] for r in second]
    for x, y in zip(first, second):
        assert y["valid"]["valid_en"]["nll"] == pytest.approx(x["valid"]["valid_en"]["nll"], rel=1e-5)


# --- bad input -----------------------------------------------------------------------------------
def _error(result):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert (len(lines) == 1 and lines[0].startswith("error: ")
            and "Traceback" not in result.stderr), result.stderr
    return lines[0]


def _stream_error(result):
    """A bad line deep inside a corpus is found while streaming, after the run's opening lines:
    one error line, the last, and no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr
    return lines[-1]


@pytest.mark.parametrize("damage, message", [
    ("missing", "error: --train_files {path}: file not found"),
    ("empty", "error: --train_files {path}: the file is empty"),
    ("latin1", "error: {path}: line 2: not UTF-8 text (byte 4 of the line)"),
    ("suffix", "error: --train_files {path}: expected plain text, a .txt or .txt.xz file"),
])
def test_bad_training_files_are_one_error_line(tmp_path, damage, message):
    path = tmp_path / ("corpus.json" if damage == "suffix" else "corpus.txt")
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "latin1":
        path.write_bytes(b"good line\nCaf\xe9 au lait\n")
    elif damage == "suffix":
        path.write_text("{}", encoding="utf-8")
    argv = pretrain_argv(tmp_path / "out", steps=2, interval=2)
    argv[argv.index(WIKI)] = str(path)
    argv.remove(GERMAN)  # the damaged file alone, so the run must read it before any step
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env=env(), capture_output=True, text=True,
                            timeout=120)
    check = _stream_error if damage == "latin1" else _error
    assert check(result) == message.format(path=path)


def test_a_damaged_xz_file_is_one_error_line(tmp_path):
    path = tmp_path / "corpus.txt.xz"
    words = random.Random(0).choices(["river", "stone", "light", "north", "glass", "winter", "field"],
                                     k=20000)
    path.write_bytes(lzma.compress(" ".join(words).encode())[:400])  # far fewer tokens than the run needs
    argv = pretrain_argv(tmp_path / "out", steps=2, interval=2)
    argv[argv.index(WIKI)] = str(path)
    argv.remove(GERMAN)  # the damaged file alone, so the run must read it before any step
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env=env(), capture_output=True, text=True,
                            timeout=120)
    assert _stream_error(result).startswith(f"error: {path}: damaged .xz stream after line")


@pytest.mark.parametrize("extra, message", [
    (["--block_size", "200"], "error: --block_size 200 is more than the model's 128 positions (n_positions)"),
    (["--max_steps", "0"], "error: --max_steps must be at least 1, got 0"),
    (["--n_embd", "31"], "error: --n_embd 31 must be a multiple of --n_head 2"),
    (["--lr", "nan"], "error: --lr must be a positive number, got nan"),
    (["--resume"], "error: --resume: no complete checkpoint/ in --output_dir {out}"),
    (["--init", "induction", "--model_checkpoint", "gpt2"],
     "error: --init induction builds a fresh model; --model_checkpoint continues one: give one of them"),
    (["--init", "induction", "--n_layer", "1"],
     "error: --init induction: an induction init needs 2+ layers, 2+ heads and n_embd >= 2 * n_freq + "
     "2 * head_dim (got 1 layers, 2 heads, n_embd 32)"),
])
def test_bad_flags_are_one_error_line(tmp_path, extra, message):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, *pretrain_argv(out, *extra, steps=2, interval=2)], cwd=REPO,
                            env=env(), capture_output=True, text=True, timeout=120)
    assert _error(result) == message.format(out=out)


def test_a_non_empty_output_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    result = subprocess.run([sys.executable, *pretrain_argv(out, steps=2, interval=2)], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=120)
    assert _error(result) == (f"error: --output_dir {out}: folder is not empty; "
                              "choose a new one or pass --resume")
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_the_toolkit_tokenizer_keeps_gpt2_ids_on_the_pretrained_vocabulary(gpt2_tokenizer):
    assert len(gpt2_tokenizer) == 50257
    text = "Der Wald ist groß."
    assert load_tokenizer()(text)["input_ids"] == gpt2_tokenizer(text)["input_ids"]


def test_max_steps_not_a_multiple_of_the_eval_interval_ends_at_max_steps(tmp_path):
    # 5 steps validated every 2: validations at 2 and 4, then the run stops at 5 (it used to run
    # on to 6, the end of the interval, past its own schedule)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, *pretrain_argv(out, steps=5, interval=2)], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(out)
    assert [r["step"] for r in metrics] == [2, 4, 5]
    assert metrics[-1]["tokens"] == 5 * 4 * 63
