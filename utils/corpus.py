"""Plain-text corpora for causal-LM pretraining: streamed, tokenized and packed into fixed-length
blocks, with a state that a checkpoint stores, so a resumed run reads exactly what it would have.

    stream = BlockStream(["wiki.txt.xz", "books.txt"], tokenizer, block_size=512, seed=0)
    block = next(stream)                    # list of block_size token ids
    state = stream.state()                  # JSON-ready dict + tensors, see restore()

Memory stays bounded whatever the corpus size: files are read line by line (`.txt` or `.txt.xz`),
a few hundred lines are tokenized at a time (their blocks wait in order), and at most
`shuffle_blocks` blocks wait in the shuffle buffer. Several files are interleaved by smooth
weighted round-robin (weights: the `PATH:WEIGHT` suffix, else the file's size on disk), a chunk of
lines at a time; a file that ends starts again (its pass count goes up). Documents are marked only
in the files named in `blank_line_documents`: there a blank line (and the file's end) ends a
document, and GPT-2's <|endoftext|> stands between documents, as in GPT-2's own pretraining;
elsewhere the text runs on, newlines included. Blocks cut the token stream every block_size tokens
and then leave through a shuffle buffer (seeded), so consecutive training blocks rarely come from
the same page.

`CopyMix` wraps a stream and turns a share of its blocks into repeated spans (text that rewards
looking back at the context, so that a small model learns to copy); see its docstring.
"""
import lzma
import os
import random

import torch

from utils.errors import VLMError

LINES_PER_CHUNK = 256       # lines tokenized in one call of the Rust tokenizer
DEFAULT_SHUFFLE_BLOCKS = 512
END_OF_TEXT = 50256         # GPT-2's <|endoftext|>, between documents
DOCUMENT_BREAK = None       # in a chunk's pieces: a document ends here


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
                    raise VLMError(f"{path}: line {number}: not UTF-8 text "  # the byte counted from 1
                                   f"(byte {error.start + 1} of the line)") from None
    except (lzma.LZMAError, EOFError) as error:
        raise VLMError(f"{path}: damaged .xz stream after line {number} ({error})") from None
    except OSError as error:
        raise VLMError(f"{path}: cannot read ({error.strerror or error})") from None


class _FileCursor:
    """One file of the stream: where it is (lines consumed, passes), read a chunk at a time."""

    def __init__(self, path, lines=0, passes=0, blank_line_documents=False):
        self.path, self.lines, self.passes = path, lines, passes
        self.blank_line_documents = blank_line_documents
        self._reader = None

    def next_chunk(self):
        """The next LINES_PER_CHUNK lines (wrapping around at the end) as a list of pieces: text
        strings, and DOCUMENT_BREAK where a document ends (blank_line_documents files only)."""
        texts = []
        read = 0
        while read < LINES_PER_CHUNK:
            if self._reader is None:
                self._reader = read_lines(self.path, skip=self.lines)
            item = next(self._reader, None)
            if item is None:
                if self.lines == 0:
                    raise VLMError(f"{self.path}: no text in the file")
                self._reader = None
                self.passes += 1
                self.lines = 0
                if self.blank_line_documents and texts and texts[-1] is not DOCUMENT_BREAK:
                    texts.append(DOCUMENT_BREAK)  # the file's end ends its last document
                if texts:
                    break
                continue
            self.lines = item[0]
            read += 1
            if self.blank_line_documents and not item[1].strip():
                if texts and texts[-1] is not DOCUMENT_BREAK:
                    texts.append(DOCUMENT_BREAK)
                continue
            texts.append(item[1])
        if not self.blank_line_documents:
            return ["".join(texts)]
        pieces = []  # consecutive lines of one document joined: one string per document part
        for text in texts:
            if text is DOCUMENT_BREAK or not pieces or pieces[-1] is DOCUMENT_BREAK:
                pieces.append(text)
            else:
                pieces[-1] += text
        return pieces


class BlockStream:
    """An endless iterator of token blocks (lists of `block_size` ids) from text files."""

    def __init__(self, specs, tokenizer, block_size, seed=0, shuffle_blocks=DEFAULT_SHUFFLE_BLOCKS,
                 what="--train_files", blank_line_documents=()):
        if not specs:
            raise VLMError(f"{what}: name at least one text file")
        self.tokenizer, self.block_size, self.shuffle_blocks = tokenizer, block_size, shuffle_blocks
        self.files, weights = [], []
        documents = {os.path.abspath(p) for p in blank_line_documents}
        paths = {os.path.abspath(parse_corpus_spec(spec)[0]) for spec in specs}
        for path in sorted(documents - paths):
            raise VLMError(f"--blank_line_documents {path}: not one of {what}")
        for spec in specs:
            path, weight = parse_corpus_spec(spec)
            check_text_file(path, what)
            self.files.append(_FileCursor(path, blank_line_documents=os.path.abspath(path) in documents))
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
                pieces = self._pick_file().next_chunk()
                texts = [p for p in pieces if p is not DOCUMENT_BREAK]
                ids = iter(self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])
                for piece in pieces:
                    if piece is DOCUMENT_BREAK:
                        self.pending.append(END_OF_TEXT)
                    else:
                        self.pending.extend(next(ids))
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
        raise VLMError(f"--valid_files {path}: {len(tokens)} tokens make no block "
                       f"of --block_size {block_size}")
    return torch.tensor(tokens[:count * block_size], dtype=torch.long).reshape(count, block_size)


class CopyMix:
    """A block stream in which a share of the blocks are repeated spans: synthetic text that only
    a model looking back at its context can predict, so that a small model learns to copy
    (induction heads) within a pretraining budget too small to find them in natural text alone.

    With probability `fraction` a block is replaced by episodes until it is full (the last one
    cut): span, gap, the same span again. A span is `span_min..span_max` tokens, drawn uniformly
    from GPT-2's text ids with probability `random_share` (a random span: every token row gets
    trained to be told apart) and otherwise the next tokens of a natural block; the gap is
    0..span natural tokens. The natural tokens come from the wrapped stream (one block, or more
    when used up), so the mix's state is its own seeded generator plus the stream's state.
    """

    def __init__(self, stream, fraction, random_share=0.5, span_min=8, span_max=64, seed=0):
        self.stream, self.fraction, self.random_share = stream, fraction, random_share
        self.span_min, self.span_max = span_min, span_max
        self.block_size = stream.block_size
        self.rng = random.Random(seed + 7919)  # apart from the stream's own shuffle generator
        self.copy_blocks = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.fraction <= 0 or self.rng.random() >= self.fraction:
            return next(self.stream)
        self.copy_blocks += 1
        return self._copy_block()

    def _copy_block(self):
        natural, block = [], []

        def take(n):
            while len(natural) < n:
                natural.extend(next(self.stream))
            out = natural[:n]
            del natural[:n]
            return out

        while len(block) < self.block_size:
            length = self.rng.randint(self.span_min, self.span_max)
            if self.rng.random() < self.random_share:
                span = [self.rng.randrange(END_OF_TEXT) for _ in range(length)]
            else:
                span = take(length)
            gap = take(self.rng.randint(0, length))
            block.extend(span + gap + span)
        return block[:self.block_size]

    def state(self):
        state, tensors = self.stream.state()
        version, internal, gauss = self.rng.getstate()
        state = dict(state, copy_mix={"rng": [version, list(internal), gauss],
                                      "copy_blocks": self.copy_blocks})
        return state, tensors

    def restore(self, state, tensors, where="checkpoint"):
        self.stream.restore(state, tensors, where)
        if "copy_mix" not in state:
            raise VLMError(f"{where}: the run had no --copy_fraction; resume it with the run's own flags")
        version, internal, gauss = state["copy_mix"]["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.copy_blocks = state["copy_mix"]["copy_blocks"]
