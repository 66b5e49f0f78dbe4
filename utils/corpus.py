"""Plain-text corpora for causal-LM pretraining: streamed, tokenized and packed into fixed-length
blocks, with a state that a checkpoint stores, so a resumed run reads exactly what it would have.

    stream = BlockStream(["wiki.txt.xz", "books.txt"], tokenizer, block_size=512, seed=0)
    block = next(stream)                    # list of block_size token ids
    state = stream.state()                  # JSON-ready dict + tensors, see restore()

Memory stays bounded whatever the corpus size: files are read line by line (`.txt` or `.txt.xz`),
a few hundred lines are tokenized at a time (their blocks wait in order), and at most
`shuffle_blocks` blocks wait in the shuffle buffer. Several files are interleaved by smooth weighted round-robin (weights: the
`PATH:WEIGHT` suffix, else the file's size on disk), a chunk of lines at a time; a file that
ends starts again (its pass count goes up). Documents are not marked: the text runs on, newlines
included, and blocks cut it every block_size tokens. Blocks then leave through a shuffle buffer
(seeded), so consecutive training blocks rarely come from the same page.
"""
import lzma
import os
import random

import torch

from utils.errors import VLMError

LINES_PER_CHUNK = 256       # lines tokenized in one call of the Rust tokenizer
DEFAULT_SHUFFLE_BLOCKS = 512


def parse_corpus_spec(spec):
    """`PATH` or `PATH:WEIGHT` -> (path, weight or None)."""
    path, sep, weight = spec.rpartition(":")
    if sep and path and weight and not os.path.exists(spec):
        try:
            value = float(weight)
        except ValueError:
            return spec, None
        if not value > 0:
            raise VLMError(f"{spec}: the weight after ':' must be a positive number")
        return path, value
    return spec, None


def check_text_file(path, what="--train_files"):
    """A readable, non-empty .txt or .txt.xz file, else one clear error."""
    if not os.path.exists(path):
        raise VLMError(f"{what} {path}: file not found")
    if not os.path.isfile(path):
        raise VLMError(f"{what} {path}: not a file")
    if not (path.endswith(".txt") or path.endswith(".txt.xz")):
        raise VLMError(f"{what} {path}: expected plain text, a .txt or .txt.xz file")
    if os.path.getsize(path) == 0:
        raise VLMError(f"{what} {path}: the file is empty")


def open_text(path):
    """Binary line reader of a .txt or .txt.xz file (decoded by read_lines, which names bad bytes)."""
    if path.endswith(".xz"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def read_lines(path, skip=0):
    """Yield (line number, text) of a text file from line skip + 1 on; undecodable bytes or a
    damaged .xz stream are one VLMError naming the file and line."""
    number = 0
    try:
        with open_text(path) as f:
            for number, raw in enumerate(f, 1):
                if number <= skip:
                    continue
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise VLMError(f"{path}: line {number}: not UTF-8 text (byte {error.start + 1} of the line)")  # counted from 1 from None
    except (lzma.LZMAError, EOFError) as error:
        raise VLMError(f"{path}: damaged .xz stream after line {number} ({error})") from None
    except OSError as error:
        raise VLMError(f"{path}: cannot read ({error.strerror or error})") from None


class _FileCursor:
    """One file of the stream: where it is (lines consumed, passes), read a chunk at a time."""

    def __init__(self, path, lines=0, passes=0):
        self.path, self.lines, self.passes = path, lines, passes
        self._reader = None

    def next_chunk(self):
        """The next LINES_PER_CHUNK lines as one string (wrapping around at the end)."""
        texts = []
        while len(texts) < LINES_PER_CHUNK:
            if self._reader is None:
                self._reader = read_lines(self.path, skip=self.lines)
            item = next(self._reader, None)
            if item is None:
                if self.lines == 0:
                    raise VLMError(f"{self.path}: no text in the file")
                self._reader = None
                self.passes += 1
                self.lines = 0
                if texts:
                    break
                continue
            self.lines = item[0]
            texts.append(item[1])
        return "".join(texts)


class BlockStream:
    """An endless iterator of token blocks (lists of `block_size` ids) from text files."""

    def __init__(self, specs, tokenizer, block_size, seed=0, shuffle_blocks=DEFAULT_SHUFFLE_BLOCKS,
                 what="--train_files"):
        if not specs:
            raise VLMError(f"{what}: name at least one text file")
        self.tokenizer, self.block_size, self.shuffle_blocks = tokenizer, block_size, shuffle_blocks
        self.files, weights = [], []
        for spec in specs:
            path, weight = parse_corpus_spec(spec)
            check_text_file(path, what)
            self.files.append(_FileCursor(path))
            weights.append(weight if weight is not None else float(os.path.getsize(path)))
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.credits = [0.0] * len(self.files)        # smooth weighted round-robin
        self.pending = []                             # tokens not yet in a block (< block_size)
        self.ready = []                               # whole blocks in text order, not yet shuffled
        self.buffer = []                              # shuffle buffer: at most shuffle_blocks blocks
        self.rng = random.Random(seed)
        self.blocks_out = 0

    # --- reading ---------------------------------------------------------------------------
    def _pick_file(self):
        for i, w in enumerate(self.weights):
            self.credits[i] += w
        best = max(range(len(self.files)), key=lambda i: self.credits[i])
        self.credits[best] -= 1.0
        return self.files[best]

    def _next_ready(self):
        """The next whole block in text order (tokenizing another chunk of lines when none is ready)."""
        while not self.ready:
            while len(self.pending) < self.block_size:
                text = self._pick_file().next_chunk()
                self.pending.extend(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
            cut = len(self.pending) - len(self.pending) % self.block_size
            self.ready = [self.pending[i:i + self.block_size] for i in range(0, cut, self.block_size)]
            self.pending = self.pending[cut:]
        return self.ready.pop(0)

    def __iter__(self):
        return self

    def __next__(self):
        while len(self.buffer) < self.shuffle_blocks:
            self.buffer.append(self._next_ready())
        index = self.rng.randrange(len(self.buffer))
        self.buffer[index], self.buffer[-1] = self.buffer[-1], self.buffer[index]
        self.blocks_out += 1
        return self.buffer.pop()

    # --- state ------------------------------------------------------------------------------
    def state(self):
        """(JSON-ready dict, tensors): everything a resumed stream needs to continue exactly."""
        version, internal, gauss = self.rng.getstate()
        state = {"files": [{"path": f.path, "lines": f.lines, "passes": f.passes} for f in self.files],
                 "credits": list(self.credits), "rng": [version, list(internal), gauss],
                 "blocks_out": self.blocks_out, "block_size": self.block_size}
        tensors = {"stream.pending": torch.tensor(self.pending, dtype=torch.int64),
                   "stream.ready": torch.tensor(self.ready, dtype=torch.int64).reshape(-1, self.block_size),
                   "stream.buffer": torch.tensor(self.buffer, dtype=torch.int64).reshape(-1, self.block_size)}
        return state, tensors

    def restore(self, state, tensors, where="checkpoint"):
        paths = [f.path for f in self.files]
        saved = [f["path"] for f in state["files"]]
        if [os.path.abspath(p) for p in saved] != [os.path.abspath(p) for p in paths]:
            raise VLMError(f"{where}: the run read {', '.join(saved)}; resume it with the same --train_files")
        if state["block_size"] != self.block_size:
            raise VLMError(f"{where}: the run used --block_size {state['block_size']}, not {self.block_size}")
        for cursor, saved_file in zip(self.files, state["files"]):
            cursor.lines, cursor.passes, cursor._reader = saved_file["lines"], saved_file["passes"], None
        self.credits = list(state["credits"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.blocks_out = state["blocks_out"]
        self.pending = tensors["stream.pending"].tolist()
        self.ready = tensors["stream.ready"].tolist()
        self.buffer = tensors["stream.buffer"].tolist()

    def passes(self):
        """{path: whole passes over the file completed so far}."""
        return {f.path: f.passes for f in self.files}


def validation_blocks(path, tokenizer, block_size, max_tokens):
    """The first max_tokens tokens of a held-out text file, as whole blocks (at least one)."""
    check_text_file(path, "--valid_files")
    tokens = []
    chunk = []
    for _, text in read_lines(path):
        chunk.append(text)
        if len(chunk) == LINES_PER_CHUNK:
            tokens.extend(tokenizer("".join(chunk), add_special_tokens=False, verbose=False)["input_ids"])
            chunk = []
            if len(tokens) >= max_tokens:
                break
    if chunk and len(tokens) < max_tokens:
        tokens.extend(tokenizer("".join(chunk), add_special_tokens=False, verbose=False)["input_ids"])
    tokens = tokens[:max_tokens]
    count = len(tokens) // block_size
    if count == 0:
        raise VLMError(f"--valid_files {path}: {len(tokens)} tokens make no block of --block_size {block_size}")
    return torch.tensor(tokens[:count * block_size], dtype=torch.long).reshape(count, block_size)
