"""The copy test (models/copy_test.py) and the pretraining text that teaches copying: documents
marked with <|endoftext|> and repeated-span blocks (utils/corpus.py)."""
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, tiny_gpt2

from models.copy_test import copy_losses, random_sequences
from utils.corpus import END_OF_TEXT, BlockStream, CopyMix

VOCAB = 50257


class InductionOracle(torch.nn.Module):
    """Copies by construction: at each position, all its belief on the token that followed the
    last earlier occurrence of the current token; uniform where the token has not been seen."""

    def __init__(self, confidence=30.0):
        super().__init__()
        self.confidence = confidence
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a parameter, so it has a device

    def forward(self, input_ids, use_cache=False):
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, VOCAB)
        for b in range(batch):
            seen = {}
            row = input_ids[b].tolist()
            for t, token in enumerate(row):
                if token in seen:
                    logits[b, t, row[seen[token] + 1]] = self.confidence
                if t + 1 < length:
                    seen[token] = t
        return SimpleNamespace(logits=logits)


class Uniform(InductionOracle):
    """Cannot copy: the same flat distribution everywhere."""

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


def test_a_model_that_copies_scores_near_zero_on_the_repeat_and_one_that_cannot_scores_ln_v():
    oracle, flat = copy_losses(InductionOracle()), copy_losses(Uniform())
    uniform = math.log(VOCAB)
    assert (flat["first"] == pytest.approx(uniform, abs=1e-4)
            and flat["repeat"] == pytest.approx(uniform, abs=1e-4))
    # first pass: nothing seen yet (a token drawn twice within 50 of 50,256 is rare), so uniform
    assert oracle["first"] == pytest.approx(uniform, rel=0.05)
    # repeat: each token predicted at e^30 / (e^30 + V - 1); the first repeated token too, since the
    # sequence's last token was seen before (its own first showing) only when it repeats: allow 1 token
    perfect = -math.log(math.exp(30.0) / (math.exp(30.0) + VOCAB - 1))
    assert perfect < 1e-6
    assert oracle["repeat"] < uniform / 50 + 1e-3
    assert oracle["sequences"] == 16 and oracle["length"] == 50


def test_random_sequences_are_fixed_by_the_seed_and_never_the_end_of_text_token():
    a, b = random_sequences(seed=0), random_sequences(seed=0)
    assert torch.equal(a, b) and a.shape == (16, 50)
    assert not torch.equal(a, random_sequences(seed=1))
    assert int(a.max()) < END_OF_TEXT and int(a.min()) >= 0


def test_a_random_gpt2_cannot_copy_and_the_model_mode_is_kept():
    model = tiny_gpt2(seed=0).train()
    result = copy_losses(model, count=4, length=20)
    assert model.training  # put back as it was
    assert abs(result["repeat"] - result["first"]) < 0.5  # no look-back: the repeat is no easier
    assert result["repeat"] > 5.0


def test_the_hand_set_induction_circuit_copies_at_init_and_a_random_init_of_its_shape_does_not():
    from transformers import GPT2Config, GPT2LMHeadModel

    from models.induction_init import induction_gpt2
    shape = dict(n_layer=2, n_embd=96, n_head=3, n_positions=128)
    wired = induction_gpt2(**shape, n_freq=8)
    plain = GPT2LMHeadModel(GPT2Config(**shape))
    wired_losses, plain_losses = copy_losses(wired), copy_losses(plain)
    assert plain_losses["repeat"] > 10.0                          # ln(50,257) = 10.8: no copying
    assert wired_losses["first"] > 10.0                           # random ids: unpredictable the first time
    assert wired_losses["repeat"] < 1.0                           # measured 0.54
    # only layers 0 and 1 are set: the other weights are GPT-2's init, so the circuit is the difference
    assert wired.config.n_layer == 2 and wired.transformer.wte.weight is wired.lm_head.weight


def test_the_command_prints_one_json_line_and_refuses_bad_flags(tiny_base):
    folder = tiny_base
    run = subprocess.run([sys.executable, "-m", "models.copy_test", "--model_checkpoint", str(folder),
                          "--sequences", "3", "--length", "10"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["sequences"] == 3 and result["length"] == 10 and result["repeat"] > 0
    bad = subprocess.run([sys.executable, "-m", "models.copy_test", "--model_checkpoint", str(folder),
                          "--length", "1"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --length must be at least 2, got 1"


# --- documents and repeated spans in the pretraining stream -------------------------------------
@pytest.fixture(scope="module")
def gpt2_tokenizer():
    """GPT-2's own tokenizer, as pretraining uses it (no added tokens)."""
    from engines.pretrain import load_tokenizer
    return load_tokenizer()


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def all_tokens(stream, count):
    return [t for _ in range(count) for t in next(stream)]


def test_blank_lines_end_documents_only_in_the_files_named(tmp_path, gpt2_tokenizer):
    text = "Alpha one.\nAlpha two.\n\nBeta one.\n\n\nGamma.\n"
    marked = write(tmp_path / "wiki.txt", text)
    plain = write(tmp_path / "books.txt", text)
    eos = END_OF_TEXT
    ids = lambda s: gpt2_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = ids("Alpha one.\nAlpha two.\n") + [eos] + ids("Beta one.\n") + [eos] + ids("Gamma.\n") + [eos]
    stream = BlockStream([marked], gpt2_tokenizer, block_size=len(expected), shuffle_blocks=1,
                         blank_line_documents=[marked])
    assert next(stream) == expected  # blank lines become one <|endoftext|>, the file's end ends the last
    unmarked = BlockStream([plain], gpt2_tokenizer, block_size=len(ids(text)), shuffle_blocks=1)
    assert next(unmarked) == ids(text) and eos not in ids(text)  # as before: the text runs on


def test_a_document_file_must_be_one_of_the_training_files(tmp_path, gpt2_tokenizer):
    from utils.errors import VLMError
    a = write(tmp_path / "a.txt", "x\n")
    with pytest.raises(VLMError, match="--blank_line_documents .*b.txt: not one of --train_files"):
        BlockStream([a], gpt2_tokenizer, block_size=4, blank_line_documents=[str(tmp_path / "b.txt")])


def test_copy_blocks_repeat_their_spans_and_resume_exactly(tmp_path, gpt2_tokenizer):
    # lines that never repeat: a natural block does not open with a repeated span
    corpus = write(tmp_path / "c.txt", "".join(f"Entry {i} says {i * 7919 % 10007} and {i * 31 % 997}.\n"
                                               for i in range(400)))
    block = 128

    def mix():
        return CopyMix(BlockStream([corpus], gpt2_tokenizer, block_size=block, shuffle_blocks=4, seed=3),
                       fraction=0.5, random_share=0.5, span_min=8, span_max=16, seed=3)

    def opens_with_a_repeat(b):
        return any(b[:span] == b[span + gap:2 * span + gap]
                   for span in range(8, 17) for gap in range(span + 1))

    stream = mix()
    blocks = [next(stream) for _ in range(20)]
    assert all(len(b) == block for b in blocks)
    assert 3 <= stream.copy_blocks <= 17  # about half
    assert sum(opens_with_a_repeat(b) for b in blocks) == stream.copy_blocks
    assert any(t >= 10000 for b in blocks if opens_with_a_repeat(b) for t in b)  # random spans: any text id
    # state() / restore(): a resumed stream gives exactly the blocks the uninterrupted one gives
    first = mix()
    for _ in range(7):
        next(first)
    state, tensors = first.state()
    state = json.loads(json.dumps(state))
    expected = [next(first) for _ in range(10)]
    resumed = mix()
    resumed.restore(state, tensors)
    assert [next(resumed) for _ in range(10)] == expected
