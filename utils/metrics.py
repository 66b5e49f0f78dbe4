"""Evaluation metrics, each a Python re-implementation of the scorer the paper's numbers came from (the
E2E scorer's Java tools excepted: they run as they are).

Official scorers reproduced here (their quirks are kept on purpose, so numbers stay comparable):

- `moses_bleu`: Moses `multi-bleu.perl` (single reference).
- `sacre_bleu`: sacrebleu's corpus BLEU (13a tokenization).
- `rouge_scores`: the authors' copy of tf_seq2seq `seq2seq/metrics/rouge.py` (n-gram SETS, sentence ROUGE-L).
- `unigram_f1`: ParlAI's unigram F1.
- `coqa_scores`: the official CoQA `evaluate-v1.0.py`.
- `e2e_scores`: the official E2E scorer (tuetschek/e2e-metrics `measure_scores.py`): BLEU/NIST as
  its default mteval-v13a-sig.pl, ROUGE-L and CIDEr as its bundled pycocoevalcap, METEOR 1.5 and the
  Stanford PTB tokenizer run in Java (utils/e2e_java.py). Without Java the tokenizer is emulated and
  METEOR is an approximation, reported as `METEOR*`.
"""
import logging
import math
import re
import string
from collections import Counter

import sacrebleu
from nltk.stem.porter import PorterStemmer
from nltk.tokenize import TreebankWordTokenizer

from utils import e2e_java
from utils.errors import VLMError

logger = logging.getLogger(__name__)


def _check_same_length(first, second, names=("hypotheses", "references")):
    """Raise VLMError unless the two lists pair up one to one."""
    if len(first) != len(second):
        raise VLMError(f"{len(first)} {names[0]} but {len(second)} {names[1]}")


def _ngram_counts(tokens, n):
    """Counter of the n-grams (as tuples) in a token list."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _lcs_length(a, b):
    """Length of the longest common subsequence of two token lists."""
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b, start=1):
            if token_a == token_b:
                current.append(previous[j - 1] + 1)
            else:
                current.append(max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def _mean(values):
    """Arithmetic mean; 0.0 for an empty list (the scorers would crash or return nan)."""
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------- Moses multi-bleu.perl

# Perl's `split` on a byte string splits on ASCII whitespace only (\v included since perl 5.18);
# Python's str.split() would also split on e.g. U+00A0, changing token counts.
_PERL_WHITESPACE = re.compile(r"[ \t\n\v\f\r]+")
_ASCII_UPPER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _moses_tokens(text, lowercase):
    """Tokens as multi-bleu.perl sees them; its `lc` on bytes only lowercases A-Z."""
    if lowercase:
        text = text.translate(_ASCII_UPPER)
    return [token for token in _PERL_WHITESPACE.split(text) if token]


def moses_bleu(hypotheses, references, lowercase=False):
    """Corpus BLEU*100 exactly as Moses multi-bleu.perl computes it (one reference per hypothesis).

    Unrounded; `round(score, 2)` is what the script prints. 0.0 when some n-gram precision is zero,
    when the hypotheses are empty (where the perl script would die), or when the lists are empty.
    """
    _check_same_length(hypotheses, references)
    correct = [0] * 4
    total = [0] * 4
    hyp_length = ref_length = 0
    for hypothesis, reference in zip(hypotheses, references):
        hyp_tokens = _moses_tokens(hypothesis, lowercase)
        ref_tokens = _moses_tokens(reference, lowercase)
        hyp_length += len(hyp_tokens)
        ref_length += len(ref_tokens)
        for n in range(1, 5):
            ref_counts = _ngram_counts(ref_tokens, n)
            for ngram, count in _ngram_counts(hyp_tokens, n).items():
                total[n - 1] += count
                correct[n - 1] += min(count, ref_counts[ngram])
    if hyp_length == 0 or ref_length == 0:
        return 0.0
    precisions = [c / t if t else 0 for c, t in zip(correct, total)]
    if 0 in precisions:
        # the script's my_log(0) is -9999999999, so exp() underflows to exactly 0
        return 0.0
    brevity_penalty = 1
    if hyp_length < ref_length:
        brevity_penalty = math.exp(1 - ref_length / hyp_length)
    # same operation order as the perl script, so the float is bit-identical
    log_sum = (math.log(precisions[0]) + math.log(precisions[1]) + math.log(precisions[2])
               + math.log(precisions[3]))
    bleu = brevity_penalty * math.exp(log_sum / 4)
    return 100 * bleu


def sacre_bleu(hypotheses, references):
    """sacrebleu corpus BLEU (0..100), default settings: 13a tokenization, exp smoothing, one reference."""
    _check_same_length(hypotheses, references)
    if not hypotheses:
        return 0.0
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score


# ---------------------------------------------------------------- ROUGE (tf_seq2seq rouge.py)

def _rouge_n_f(hyp_tokens, ref_tokens, n):
    """F score over the SETS of n-grams, as tf_seq2seq computes it."""
    hyp_ngrams = set(_ngram_counts(hyp_tokens, n))
    ref_ngrams = set(_ngram_counts(ref_tokens, n))
    overlap = len(hyp_ngrams & ref_ngrams)
    precision = overlap / len(hyp_ngrams) if hyp_ngrams else 0.0
    recall = overlap / len(ref_ngrams) if ref_ngrams else 0.0
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def _rouge_l_f(hyp_tokens, ref_tokens):
    """Sentence-level ROUGE-L F with tf_seq2seq's beta = P/R and its 1e-12 guards."""
    lcs = _lcs_length(hyp_tokens, ref_tokens)
    recall = lcs / len(ref_tokens)
    precision = lcs / len(hyp_tokens)
    beta = precision / (recall + 1e-12)
    numerator = (1 + beta ** 2) * recall * precision
    denominator = recall + (beta ** 2) * precision
    return numerator / (denominator + 1e-12)


def rouge_scores(hypotheses, references):
    """Mean per-example ROUGE-1/2/L F scores as FRACTIONS (0..1), plus `rouge_mean` of the three.

    Tokens are `text.split(" ")`, exactly as the authors' tf_seq2seq copy does (so "" is one empty token).
    """
    _check_same_length(hypotheses, references)
    pairs = [(hypothesis.split(" "), reference.split(" "))
             for hypothesis, reference in zip(hypotheses, references)]
    scores = {
        "rouge1": _mean([_rouge_n_f(h, r, 1) for h, r in pairs]),
        "rouge2": _mean([_rouge_n_f(h, r, 2) for h, r in pairs]),
        "rougeL": _mean([_rouge_l_f(h, r) for h, r in pairs]),
    }
    scores["rouge_mean"] = (scores["rouge1"] + scores["rouge2"] + scores["rougeL"]) / 3
    return scores


# ---------------------------------------------------------------- ParlAI unigram F1

_PARLAI_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PARLAI_PUNCTUATION = re.compile(r"[!\"#$%&()*+,\-./:;<=>?@\[\]\\^`{|}~_']")


def _parlai_normalize(text):
    """ParlAI's normalize_answer: punctuation becomes a space (unlike SQuAD/CoQA, which delete it)."""
    text = _PARLAI_PUNCTUATION.sub(" ", text.lower())
    text = _PARLAI_ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _token_f1(pred_tokens, gold_tokens):
    """Bag-of-tokens F1; 0 when nothing overlaps."""
    common = Counter(gold_tokens) & Counter(pred_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def unigram_f1(hypotheses, references):
    """Mean per-example ParlAI unigram F1, as a fraction (0..1)."""
    _check_same_length(hypotheses, references)
    return _mean([
        _token_f1(_parlai_normalize(h).split(), _parlai_normalize(r).split())
        for h, r in zip(hypotheses, references)
    ])


# ---------------------------------------------------------------- CoQA (official evaluate-v1.0.py)

_COQA_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def coqa_normalize_answer(text):
    """Lowercase, delete punctuation, replace articles by spaces, collapse whitespace (official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _COQA_ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _coqa_tokens(text):
    return coqa_normalize_answer(text).split() if text else []


def coqa_exact(gold, prediction):
    """1 if the normalized strings are equal, else 0."""
    return int(coqa_normalize_answer(gold) == coqa_normalize_answer(prediction))


def coqa_f1(gold, prediction):
    """Official CoQA token F1; when either side normalizes to nothing, 1 only if both do."""
    gold_tokens = _coqa_tokens(gold)
    pred_tokens = _coqa_tokens(prediction)
    if not gold_tokens or not pred_tokens:
        return int(gold_tokens == pred_tokens)
    return _token_f1(pred_tokens, gold_tokens)


def _coqa_turn_scores(golds, prediction):
    """(em, f1) of one turn: leave-one-out max over golds when there are several, as the official script."""
    if len(golds) > 1:
        others = [golds[:i] + golds[i + 1:] for i in range(len(golds))]
    else:
        others = [golds]
    em = sum(max(coqa_exact(g, prediction) for g in rest) for rest in others)
    f1 = sum(max(coqa_f1(g, prediction) for g in rest) for rest in others)
    return em / len(golds), f1 / len(golds)


def coqa_scores(predictions, gold):
    """Official CoQA overall F1/EM as percentages, averaged over ALL gold turns.

    `gold`: {(story_id, turn_id): [answer, ...]}; `predictions`: [{"id", "turn_id", "answer"}].
    A turn without a prediction scores 0, which is what the official script's overall number does
    (it warns and counts the turn). Keys are matched as given: use the same turn_id type on both sides.
    """
    predicted = {}
    for prediction in predictions:
        try:
            predicted[(prediction["id"], prediction["turn_id"])] = prediction["answer"]
        except (KeyError, TypeError) as error:
            raise VLMError(f"CoQA prediction {prediction!r} lacks id/turn_id/answer") from error
    em_total = f1_total = 0.0
    for key, golds in gold.items():
        if not golds:
            raise VLMError(f"CoQA turn {key!r} has no gold answers")
        if key in predicted:
            em, f1 = _coqa_turn_scores(list(golds), predicted[key])
            em_total += em
            f1_total += f1
    turns = len(gold)
    return {
        "f1": 100.0 * f1_total / turns if turns else 0.0,
        "em": 100.0 * em_total / turns if turns else 0.0,
        "turns": turns,
    }


# ---------------------------------------------------------------- E2E NLG (tuetschek/e2e-metrics)

def e2e_group_references(mrs, refs):
    """Group references by meaning representation: (unique MRs in first-seen order, their reference lists)."""
    _check_same_length(mrs, refs, names=("MRs", "references"))
    grouped = {}
    for mr, ref in zip(mrs, refs):
        grouped.setdefault(mr, []).append(ref)
    return list(grouped), list(grouped.values())


# mteval-v13a-sig.pl, which measure_scores.py runs for BLEU and NIST by default: its SGML reader makes
# each whitespace run one space, then its `tokenization` applies these rules in this order
_MTEVAL_RULES = [
    (re.compile(r"<skipped>"), ""),
    (re.compile(r"&quot;"), '"'),
    (re.compile(r"&amp;"), "&"),
    (re.compile(r"&lt;"), "<"),
    (re.compile(r"&gt;"), ">"),
]
_MTEVAL_PUNCT_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # ASCII punctuation except . , - '
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma not after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma not before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]


def _mteval_tokens(text):
    """mteval tokens, lower-cased as it lower-cases without -c: ASCII letters only (tr/[A-Z]/[a-z]/)."""
    text = re.sub(r"\s+", " ", text)
    for pattern, replacement in _MTEVAL_RULES:
        text = pattern.sub(replacement, text)
    text = " " + text.translate(_ASCII_UPPER) + " "
    for pattern, replacement in _MTEVAL_PUNCT_RULES:
        text = pattern.sub(replacement, text)
    return text.split()


def _merged_max_counts(token_lists, n):
    """For each n-gram, its highest count in any one reference (BLEU clipping)."""
    merged = Counter()
    for tokens in token_lists:
        for ngram, count in _ngram_counts(tokens, n).items():
            merged[ngram] = max(merged[ngram], count)
    return merged


def _clipped_hits(hyp_tokens, merged, n):
    return {ngram: min(count, merged[ngram]) for ngram, count in _ngram_counts(hyp_tokens, n).items()
            if merged[ngram]}


def _closest_length(ref_lengths, hyp_length):
    """mteval's 'closest' reference length: ties go to the shorter; empty references are skipped
    (after the first)."""
    closest = ref_lengths[0]
    for length in ref_lengths[1:]:
        if length and (abs(hyp_length - length), length) < (abs(hyp_length - closest), closest):
            closest = length
    return closest


def _e2e_bleu(hyp_token_lists, ref_token_lists, max_n=4):
    """mteval BLEU (a fraction) over the corpus, with its smoothing: the k-th n without any match
    counts 1 / 2^k matches; an n without any hypothesis n-gram is left out of the product."""
    hits = [0] * max_n
    cand_lengths = [0] * max_n
    ref_length = 0
    for hyp, refs in zip(hyp_token_lists, ref_token_lists):
        for n in range(1, max_n + 1):
            hits[n - 1] += sum(_clipped_hits(hyp, _merged_max_counts(refs, n), n).values())
            cand_lengths[n - 1] += max(len(hyp) - n + 1, 0)
        ref_length += _closest_length([len(ref) for ref in refs], len(hyp))
    if not cand_lengths[0]:
        return 0.0
    log_sum, smooth = 0.0, 1
    for hit, count in zip(hits, cand_lengths):
        if count and not hit:
            smooth *= 2
            log_sum += math.log(1 / (smooth * count))
        elif count:
            log_sum += math.log(hit / count)
    return math.exp(log_sum / max_n) * math.exp(min(0.0, 1 - ref_length / cand_lengths[0]))


def _e2e_nist(hyp_token_lists, ref_token_lists, max_n=5):
    """mteval NIST: information weights from every reference of the corpus, and the corpus length
    penalty against the mean reference length (all reference words / references per segment)."""
    # ref_ngram_counts[k] counts k-grams over every reference; the 0-gram count is the total word count
    ref_ngram_counts = [Counter() for _ in range(max_n + 1)]
    hit_ngrams = [Counter() for _ in range(max_n)]
    cand_lengths = [0] * max_n
    ref_words = ref_count = 0
    for hyp, refs in zip(hyp_token_lists, ref_token_lists):
        for n in range(1, max_n + 1):
            cand_lengths[n - 1] += max(len(hyp) - n + 1, 0)
            hit_ngrams[n - 1].update(_clipped_hits(hyp, _merged_max_counts(refs, n), n))
            for ref in refs:
                ref_ngram_counts[n].update(_ngram_counts(ref, n))
        ref_words += sum(len(ref) for ref in refs)
        ref_count += sum(1 for ref in refs if ref)
    if not ref_words:
        return 0.0  # (mteval divides by zero)
    ref_ngram_counts[0][()] = ref_words

    def info(ngram):
        """-log2 of the share of the n-gram's first n-1 words that its last word follows."""
        count, prefix = ref_ngram_counts[len(ngram)][ngram], ref_ngram_counts[len(ngram) - 1][ngram[:-1]]
        return -math.log(count / prefix) / math.log(2)  # mteval's operations, for the same floats

    score = 0.0
    for n in range(max_n):
        score += sum(info(ngram) * hits for ngram, hits in hit_ngrams[n].items()) / max(cand_lengths[n], 1)
    mean_ref_length = ref_words / (ref_count / len(ref_token_lists))
    return score * _nist_length_penalty(cand_lengths[0] / mean_ref_length)


def _nist_length_penalty(ratio):
    """exp(-beta * log^2(ratio)), beta chosen so that a length ratio of 2/3 gives 0.5 (mteval)."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) / math.log(1.5)  # mteval's operations, for the same floats
    return math.exp(-beta * math.log(ratio) * math.log(ratio))


# pycocoevalcap drops these tokens after Stanford PTB tokenization; brackets come out as -lrb- etc.
# (lower-cased, so its "-LRB-" never matches them) and are kept
_COCO_PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_TREEBANK = TreebankWordTokenizer()
# Rewrites that make nltk's Treebank tokenizer behave like Stanford's PTBTokenizer on E2E-style text
# (checked against stanford-corenlp-3.4.1 on the E2E dev references):
_PTB_REWRITES = [
    (re.compile(r"£"), " # "),  # PTB3 escaping maps the pound sign to "#" and splits it off the number
    (re.compile(r"([€¥])"), r" \1 "),  # other currency signs are split off too
    (re.compile(r"(?<=[^\s.])(\.+)(?=\s|$)"), r" \1"),  # Treebank splits a period only at the end of
                                                        # its input
    (re.compile(r"(?<=\w)-(?=\s|$)"), " -"),  # a trailing hyphen ("Cambridge- a") is its own token
    (re.compile(r"(^|\s)'(?=\w)"), r"\1' "),  # an opening single quote is split off
    (re.compile(r"(^|\s)([.\-]+)(?=[a-z])"), r"\1\2 "),  # so are leading periods/hyphens
                                                         # (".price", "-friendly")
]


def _coco_tokens(text):
    """Approximation of pycocoevalcap's Stanford PTBTokenizer (-lowerCase) + punctuation removal."""
    text = text.lower()
    for pattern, replacement in _PTB_REWRITES:
        text = pattern.sub(replacement, text)
    return [token.lower() for token in _TREEBANK.tokenize(text, convert_parentheses=True)
            if token not in _COCO_PUNCTUATION and token.strip(".")]  # runs of periods are punctuation too


def _coco_rouge_l(hyp_tokens, ref_token_lists, beta=1.2):
    """pycocoevalcap ROUGE-L of one segment: max precision and max recall over references, F with beta 1.2."""
    precisions, recalls = [], []
    for ref_tokens in ref_token_lists:
        lcs = _lcs_length(ref_tokens, hyp_tokens)
        precisions.append(lcs / len(hyp_tokens))
        recalls.append(lcs / len(ref_tokens))
    precision, recall = max(precisions), max(recalls)
    if precision == 0 or recall == 0:
        return 0.0
    return ((1 + beta ** 2) * precision * recall) / (recall + beta ** 2 * precision)


def _cider_vector(counts, doc_frequency, log_num_docs, max_n):
    """TF-IDF vectors per n, their norms, and the CIDEr 'length' (pycocoevalcap counts BIGRAMS here)."""
    vectors = [{} for _ in range(max_n)]
    norms = [0.0] * max_n
    length = 0
    for ngram, term_freq in counts.items():
        n = len(ngram) - 1
        weight = term_freq * (log_num_docs - math.log(max(1.0, doc_frequency[ngram])))
        vectors[n][ngram] = weight
        norms[n] += weight ** 2
        if n == 1:  # sic: pycocoevalcap's length is the bigram count, kept for comparable numbers
            length += term_freq
    return vectors, [math.sqrt(norm) for norm in norms], length


def _cider_similarity(hyp, ref, max_n, sigma):
    """Clipped cosine similarity per n with the Gaussian length penalty (CIDEr-D)."""
    hyp_vectors, hyp_norms, hyp_length = hyp
    ref_vectors, ref_norms, ref_length = ref
    penalty = math.e ** (-((hyp_length - ref_length) ** 2) / (2 * sigma ** 2))
    values = []
    for n in range(max_n):
        value = sum(min(weight, ref_vectors[n].get(ngram, 0.0)) * ref_vectors[n].get(ngram, 0.0)
                    for ngram, weight in hyp_vectors[n].items())
        if hyp_norms[n] != 0 and ref_norms[n] != 0:
            value /= hyp_norms[n] * ref_norms[n]
        values.append(value * penalty)
    return values


def _cider_d(hyp_token_lists, ref_token_lists, max_n=4, sigma=6.0):
    """pycocoevalcap CIDEr-D: corpus mean of 10 * mean_n(clipped cosine), averaged over references."""
    def all_ngrams(tokens):
        counts = Counter()
        for n in range(1, max_n + 1):
            counts.update(_ngram_counts(tokens, n))
        return counts

    hyp_counts = [all_ngrams(hyp) for hyp in hyp_token_lists]
    ref_counts = [[all_ngrams(ref) for ref in refs] for refs in ref_token_lists]
    # document frequency: in how many segments' reference sets an n-gram occurs
    doc_frequency = Counter()
    for refs in ref_counts:
        doc_frequency.update(set().union(*refs))
    log_num_docs = math.log(len(ref_counts))
    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        hyp_vector = _cider_vector(hyp, doc_frequency, log_num_docs, max_n)
        total = [0.0] * max_n
        for ref in refs:
            similarity = _cider_similarity(hyp_vector, _cider_vector(ref, doc_frequency, log_num_docs, max_n),
                                           max_n, sigma)
            total = [t + s for t, s in zip(total, similarity)]
        scores.append(sum(total) / max_n / len(refs) * 10.0)
    return _mean(scores)


_STEMMER = PorterStemmer()


def _match_positions(hyp_words, ref_words):
    """Greedy one-to-one matching, right to left as nltk does; returns ([(hyp_i, ref_j)], unmatched
    hyp, ref)."""
    ref_positions = {}
    for j, (_, word) in enumerate(ref_words):
        ref_positions.setdefault(word, []).append(j)
    matches, used_hyp, used_ref = [], set(), set()
    for i in range(len(hyp_words) - 1, -1, -1):
        positions = ref_positions.get(hyp_words[i][1])
        if positions:
            j = positions.pop()
            used_hyp.add(i)
            used_ref.add(j)
            matches.append((hyp_words[i][0], ref_words[j][0]))
    rest_hyp = [pair for i, pair in enumerate(hyp_words) if i not in used_hyp]
    rest_ref = [pair for j, pair in enumerate(ref_words) if j not in used_ref]
    return matches, rest_hyp, rest_ref


def _count_chunks(matches):
    """Number of runs of matches adjacent in both hypothesis and reference."""
    chunks = 1
    for (i, j), (next_i, next_j) in zip(matches, matches[1:]):
        if not (next_i == i + 1 and next_j == j + 1):
            chunks += 1
    return chunks


def _meteor_single(hyp_tokens, ref_tokens, alpha=0.9, beta=3.0, gamma=0.5):
    """nltk-style METEOR for one pair: exact, then Porter-stem matches (no WordNet synonyms)."""
    hyp_words = list(enumerate(hyp_tokens))
    ref_words = list(enumerate(ref_tokens))
    exact, hyp_rest, ref_rest = _match_positions(hyp_words, ref_words)
    stemmed, _, _ = _match_positions([(i, _STEMMER.stem(w)) for i, w in hyp_rest],
                                     [(j, _STEMMER.stem(w)) for j, w in ref_rest])
    matches = sorted(exact + stemmed)
    if not matches:
        return 0.0
    precision = len(matches) / len(hyp_tokens)
    recall = len(matches) / len(ref_tokens)
    fmean = (precision * recall) / (alpha * precision + (1 - alpha) * recall)
    fragmentation = _count_chunks(matches) / len(matches)
    return (1 - gamma * fragmentation ** beta) * fmean


def _meteor_approx(hyp_token_lists, ref_token_lists):
    """Mean over segments of the best single-reference METEOR score."""
    return _mean([max(_meteor_single(hyp, ref) for ref in refs)
                  for hyp, refs in zip(hyp_token_lists, ref_token_lists)])


def _official_captions(hypotheses, references):
    """Captions and METEOR 1.5 from the Java tools (e2e_java), or JavaUnavailable. References are
    tokenized first, then hypotheses, in two runs, as pycocoevalcap does."""
    captions = iter(e2e_java.ptb_captions([ref for refs in references for ref in refs]))
    ref_captions = [[next(captions) for _ in refs] for refs in references]
    hyp_captions = e2e_java.ptb_captions(hypotheses)
    return hyp_captions, ref_captions, "METEOR", e2e_java.meteor(hyp_captions, ref_captions)


def _approximate_captions(hypotheses, references):
    """The same without Java: emulated PTB tokens and the approximate METEOR, named METEOR*."""
    hyp_tokens = [_coco_tokens(h) for h in hypotheses]
    ref_tokens = [[_coco_tokens(r) for r in refs] for refs in references]
    return ([" ".join(tokens) for tokens in hyp_tokens],
            [[" ".join(tokens) for tokens in refs] for refs in ref_tokens],
            "METEOR*", _meteor_approx(hyp_tokens, ref_tokens))


def e2e_scores(hypotheses, references, java=True):
    """E2E challenge metrics as its official scorer computes them; `references[i]` lists every
    reference of the i-th MR. Returns BLEU (a fraction, e.g. 0.6619), NIST, METEOR (0..1), ROUGE_L
    (0..1) and CIDEr, as tuetschek/e2e-metrics `measure_scores.py` does:

    - BLEU and NIST as its default mteval-v13a-sig.pl (not its `-p` pymteval, whose NIST length
      penalty differs when MRs have different numbers of references);
    - ROUGE-L (beta 1.2, max P and R over references) and CIDEr-D (n=4, sigma=6, idf from the
      references, clipping, x10) as its pycocoevalcap, on the captions of the Stanford PTB tokenizer;
    - METEOR: METEOR 1.5 itself.

    The tokenizer and METEOR are Java (utils/e2e_java.py, pycocoevalcap's files). Without `java` on
    PATH, with java=False, or when a Java run fails, the tokenizer is emulated (nltk's Treebank
    tokenizer with rewrites) and METEOR is replaced by an approximation reported as `METEOR*`:
    nltk-style exact + Porter-stem matching (alpha 0.9, beta 3, gamma 0.5; no paraphrases, no WordNet),
    best reference per segment, averaged over segments. METEOR* is not comparable to METEOR 1.5.
    """
    _check_same_length(hypotheses, references)
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise VLMError(f"E2E item {i}: references must be a non-empty list of strings")
    if not hypotheses:
        meteor = "METEOR" if java and e2e_java.available() else "METEOR*"
        return {"BLEU": 0.0, "NIST": 0.0, meteor: 0.0, "ROUGE_L": 0.0, "CIDEr": 0.0}
    mteval_hyps = [_mteval_tokens(h) for h in hypotheses]
    mteval_refs = [[_mteval_tokens(r) for r in refs] for refs in references]
    captions = None
    if java:
        try:
            captions = _official_captions(hypotheses, references)
        except e2e_java.JavaUnavailable as why:
            if not why.quiet:
                logger.warning("E2E metrics: the official Java tools could not run (%s); METEOR* is "
                               "an approximation", why)
    hyp_captions, ref_captions, meteor, meteor_score = captions or _approximate_captions(hypotheses,
                                                                                          references)
    # pycocoevalcap's ROUGE-L splits captions on " " (an empty caption is one empty token), CIDEr on
    # any whitespace
    return {
        "BLEU": _e2e_bleu(mteval_hyps, mteval_refs),
        "NIST": _e2e_nist(mteval_hyps, mteval_refs),
        meteor: meteor_score,
        "ROUGE_L": _mean([_coco_rouge_l(h.split(" "), [r.split(" ") for r in refs])
                          for h, refs in zip(hyp_captions, ref_captions)]),
        "CIDEr": _cider_d([h.split() for h in hyp_captions],
                          [[r.split() for r in refs] for refs in ref_captions]),
    }


def perplexity(mean_nll):
    """exp of the mean per-token negative log-likelihood (natural log)."""
    return math.exp(mean_nll)


# ---------------------------------------------------------------- user tasks (task files)
#
# Scores for the tasks of a task file (tasks/task_file.py): `accuracy` (label_accuracy),
# `intent_slot` (intent_slot_scores), `exact_match`, `token_f1`; all fractions (0..1), and 0.0
# for empty lists.

def normalize_label(text):
    """A label as labels are compared: whitespace runs made one space, the ends stripped, and
    lowercased (str.casefold), so " Positive\\n" and "positive" are one label."""
    return " ".join(text.split()).casefold()


def apply_label_map(texts, label_map=None):
    """Each text normalized (normalize_label) and, when the label map holds it, replaced by its
    canonical label (variants are looked up normalized, so the map's keys ignore case too)."""
    mapping = {normalize_label(variant): normalize_label(label)
               for variant, label in (label_map or {}).items()}
    return [mapping.get(normalize_label(text), normalize_label(text)) for text in texts]


def label_accuracy(predictions, references, label_map=None):
    """Fraction of predictions equal to their reference, both sides normalized and mapped by
    apply_label_map (e.g. {"positivt": "positive"} makes the Swedish variant count as positive)."""
    _check_same_length(predictions, references, ("predictions", "references"))
    predicted = apply_label_map(predictions, label_map)
    gold = apply_label_map(references, label_map)
    return _mean([float(p == g) for p, g in zip(predicted, gold)])


def exact_match(predictions, references):
    """Fraction of predictions equal to their reference once both ends are stripped of whitespace;
    case, punctuation and inner spacing count."""
    _check_same_length(predictions, references, ("predictions", "references"))
    return _mean([float(p.strip() == r.strip()) for p, r in zip(predictions, references)])


def token_f1(predictions, references):
    """Mean per-example token F1 as SQuAD and CoQA compute it (coqa_f1: lowercased, punctuation
    and articles removed; 1.0 when both sides are empty after that, 0.0 when one side is)."""
    _check_same_length(predictions, references, ("predictions", "references"))
    return _mean([coqa_f1(r, p) for p, r in zip(predictions, references)])


_INTENT_SLOTS = re.compile(r"Intent:[ \t]*(\S[^\n]*?)[ \t]*\n[ \t]*Slots:[ \t]*(\S[^\n]*?)")
_SLOT_PAIR = re.compile(r"[ \t]*([^\s(),][^(),\n]*?)[ \t]*\(([^()\n]*)\)[ \t]*(?:,|$)")


def parse_intent_slots(text):
    """"Intent: X\\nSlots: a(b), c(d)" -> ("X", [("a", "b"), ("c", "d")]); "Slots: None" gives no
    pairs. Names and values are stripped; anything else (a missing line, an unclosed bracket,
    text between pairs) gives None."""
    match = _INTENT_SLOTS.fullmatch(text.strip())
    if not match:
        return None
    intent, slots = match.groups()
    if slots == "None":
        return intent, []
    pairs, position = [], 0
    while position < len(slots):
        pair = _SLOT_PAIR.match(slots, position)
        if not pair or pair.end() == position:
            return None
        pairs.append((pair.group(1), pair.group(2).strip()))
        position = pair.end()
    if slots.rstrip().endswith(","):
        return None
    return intent, pairs


def intent_slot_scores(predictions, references):
    """Intent accuracy (exact match of the intent) and micro precision/recall/F1 over the
    (slot, value) pairs of every example, counted as multisets (a pair given twice must be
    predicted twice). Names and values compare exactly (case counts). A prediction that does not
    parse (parse_intent_slots) has a wrong intent and no pairs; a reference that does not parse is
    an error. A ratio with nothing to divide by (no predicted or no reference pairs) is 0.0."""
    _check_same_length(predictions, references, ("predictions", "references"))
    intents_right = predicted_pairs = gold_pairs = right_pairs = 0
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        gold = parse_intent_slots(reference)
        if gold is None:
            raise VLMError(f"reference {index}: cannot parse {reference[:80]!r} as "
                           "'Intent: X\\nSlots: a(b), ...'")
        predicted = parse_intent_slots(prediction) or (None, [])
        intents_right += predicted[0] == gold[0]
        predicted_pairs += len(predicted[1])
        gold_pairs += len(gold[1])
        right_pairs += sum((Counter(predicted[1]) & Counter(gold[1])).values())
    precision = right_pairs / predicted_pairs if predicted_pairs else 0.0
    recall = right_pairs / gold_pairs if gold_pairs else 0.0
    return {
        "intent_accuracy": intents_right / len(references) if references else 0.0,
        "slot_precision": precision,
        "slot_recall": recall,
        "slot_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }
