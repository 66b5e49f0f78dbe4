"""The one registry of metrics that tasks name: the task table's `metrics` and a task file's
`metric` are keys of METRICS.

A metric scores decoded outputs against references: `score(outputs, references, **options)`
returns {name: value}. What one reference is depends on the metric (`references`):

    "text"    one string per output (a task file may name these)
    "texts"   a list of strings per output (E2E's multi-reference MRs)
    "coqa"    {"id", "turn_id", "answer"} per output (CoQA's scorer groups turns by story)
    "none"    a teacher-forced metric, computed from the model and the gold replies, not from outputs

Each task's `references(prompts)` gives its references in the form its metrics read (tested for
every built-in task). The implementations are in utils/metrics.py.
To add a metric: write its function in utils/metrics.py and one entry here.
"""
from dataclasses import dataclass

from utils import metrics


@dataclass(frozen=True)
class Metric:
    name: str
    references: str             # "text" | "texts" | "coqa" | "none" (see the module docstring)
    score: object = None        # (outputs, references, **options) -> {name: value}; None if teacher-forced
    description: str = ""

    @property
    def teacher_forced(self):
        return self.score is None


def _coqa(outputs, references, **_):
    predictions = [{"id": r["id"], "turn_id": r["turn_id"], "answer": out}
                   for r, out in zip(references, outputs)]
    gold = {(r["id"], r["turn_id"]): [r["answer"]] for r in references}
    return metrics.coqa_scores(predictions, gold)


METRICS = {m.name: m for m in (
    Metric("accuracy", "text", lambda out, refs, label_map=None, **_: {
        "accuracy": metrics.label_accuracy(out, refs, label_map)},
        "exact label match after the task's label_map (stripped, lowercased)"),
    Metric("intent_slot", "text", lambda out, refs, **_: metrics.intent_slot_scores(out, refs),
           "intent accuracy and slot precision/recall/F1 of 'Intent: ... Slots: ...' answers"),
    Metric("exact_match", "text", lambda out, refs, **_: {"exact_match": metrics.exact_match(out, refs)},
           "share of answers equal to the reference"),
    Metric("token_f1", "text", lambda out, refs, **_: {"token_f1": metrics.token_f1(out, refs)},
           "SQuAD-style token F1"),
    Metric("bleu", "text", lambda out, refs, **_: {"bleu": metrics.moses_bleu(out, refs)},
           "Moses multi-bleu.perl BLEU"),
    Metric("rouge", "text", lambda out, refs, **_: metrics.rouge_scores(out, refs),
           "ROUGE-1/2/L F1"),
    Metric("sacrebleu", "text", lambda out, refs, **_: {"sacrebleu": metrics.sacre_bleu(out, refs)},
           "sacrebleu corpus BLEU (13a)"),
    Metric("f1", "text", lambda out, refs, **_: {"f1": metrics.unigram_f1(out, refs)},
           "ParlAI unigram F1"),
    Metric("e2e", "texts", lambda out, refs, **_: metrics.e2e_scores(out, refs),
           "the official E2E scorer's BLEU, NIST, METEOR (METEOR 1.5 in Java; without Java an "
           "approximation, METEOR*), ROUGE_L and CIDEr over multi-reference MRs"),
    Metric("coqa", "coqa", _coqa, "CoQA's official exact match and F1"),
    Metric("ppl", "none", None, "teacher-forced perplexity of the gold replies"),
)}

# What a task file's `metric` may be: the metrics of one plain reference string per answer.
TEXT_METRICS = tuple(name for name, m in METRICS.items() if m.references == "text")
