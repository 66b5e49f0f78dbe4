"""Sequence-to-sequence tasks (mt, summarization): a source text in, a target text out.

Record: {"src": str, "tgt": str}. Input layout (the authors'):
    <bos> <source> src ... <target> tgt ... <eos>
with segment ids <bos>, then <source> over the source, then <target> over the reply.
Training drops pairs under `min_tokens` on either side and cuts sources and targets to
`max_source_tokens` / `max_target_tokens`; evaluation cuts only the source.
"""
import logging
from dataclasses import dataclass
from itertools import chain

from tasks.base import BuiltinTask
from utils.data import IGNORE_INDEX
from utils.vocab import special_token_id

logger = logging.getLogger(__name__)

PARTITION_BUCKET = 8  # tokens per source-length bucket, the key a non-IID split of mt skews by


def check_str(value, key, fail):
    if not isinstance(value, str):
        fail(f"{key!r} must be a string, got {type(value).__name__}")


def check_str_list(value, key, fail, allow_empty=False):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        fail(f"{key!r} must be a list of strings")
    if not value and not allow_empty:
        fail(f"{key!r} is empty")


def labelled(sequence):
    """input_ids and labels of segments whose last one is the reply: labels are -100 everywhere
    but the reply's tokens after its leading segment token (and its eos)."""
    input_ids = list(chain(*sequence))
    labels = [IGNORE_INDEX] * (len(input_ids) - len(sequence[-1]) + 1) + sequence[-1][1:]
    return input_ids, labels


@dataclass(frozen=True)
class SourceTargetTask(BuiltinTask):
    """A record is one example with one target string under "tgt" (seq2seq and nlg)."""
    record_keys = ("src", "tgt")

    def warn_about(self, rows, path, split):
        # Kept (the authors' loaders kept them too), but said: such a record teaches only eos.
        empty = sum(not record["tgt"].strip() for record in rows)
        if empty:
            logger.warning("%s: split %r: %d of %d records have an empty 'tgt'", path, split, empty,
                           len(rows))


@dataclass(frozen=True)
class Seq2SeqTask(SourceTargetTask):
    kind = "seq2seq"
    def check_fields(self, record, fail):
        check_str(record["src"], "src", fail)
        check_str(record["tgt"], "tgt", fail)

    def iter_contexts(self, records, max_history, target_key=None, rotate_persona=True, for_training=True):
        for record in records:
            target = record[target_key or "tgt"]
            if for_training and (len(record["src"]) < self.min_tokens or len(target) < self.min_tokens):
                continue
            source = record["src"][:self.max_source_tokens] if self.max_source_tokens else record["src"]
            if for_training and self.max_target_tokens:
                target = target[:self.max_target_tokens]
            yield source, target, record, None

    def build_inputs(self, context, reply, with_eos=True):
        """context: the source ids."""
        bos, eos, src, tgt = (special_token_id(t) for t in self.special_tokens[:4])
        reply = list(reply) + ([eos] if with_eos else [])
        sequence = [[bos], [src] + list(context), [tgt] + reply]
        token_types = [bos] + [src] * len(sequence[1]) + [tgt] * len(sequence[2])
        input_ids, labels = labelled(sequence)
        return {"input_ids": input_ids, "token_type_ids": token_types, "labels": labels}

    def partition_key(self, record):
        """The source's length bucket: `src 8-15` for 8 to 15 tokens."""
        low = len(record["src"]) // PARTITION_BUCKET * PARTITION_BUCKET
        return f"src {low}-{low + PARTITION_BUCKET - 1}"

    def input_context(self, item, encode, get, max_history, where):
        """{"src": text} (or the text itself): the source, cut as evaluation cuts it."""
        source = encode(get("src", str))
        return source[:self.max_source_tokens] if self.max_source_tokens else source
