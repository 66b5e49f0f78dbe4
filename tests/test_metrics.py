"""Hand-computed cases for utils.metrics; every expected value is worked out in the comments."""
import math

import pytest
from nltk.translate.meteor_score import single_meteor_score

from utils import metrics
from utils.errors import VLMError
from utils.metrics import (
    coqa_exact,
    coqa_f1,
    coqa_normalize_answer,
    coqa_scores,
    e2e_group_references,
    e2e_scores,
    moses_bleu,
    perplexity,
    rouge_scores,
    sacre_bleu,
    unigram_f1,
)

# Two sentences, worked out n by n:
#   "the cat sat on the mat" vs "the cat sat on the red mat": 1g 6/6, 2g 4/5 (not "the mat"),
#       3g 3/4 (not "on the mat"), 4g 2/3 (not "sat on the mat")
#   "a b c d" vs "a b c d e": 1g 4/4, 2g 3/3, 3g 2/2, 4g 1/1
#   corpus: p1 = 10/10, p2 = 7/8, p3 = 5/6, p4 = 3/4; hyp_len 10 < ref_len 12, BP = exp(1 - 12/10)
#   BLEU = 100 * exp(-0.2) * (105/192) ** (1/4) = 70.4066, which multi-bleu.perl prints as 70.41
TWO_HYPS = ["the cat sat on the mat", "a b c d"]
TWO_REFS = ["the cat sat on the red mat", "a b c d e"]


def test_moses_bleu_identical_corpus_is_100():
    assert moses_bleu(["a b c d e", "f g h i"], ["a b c d e", "f g h i"]) == 100.0


def test_moses_bleu_two_sentences_with_brevity_penalty():
    score = moses_bleu(TWO_HYPS, TWO_REFS)
    assert score == pytest.approx(100 * math.exp(-0.2) * (105 / 192) ** 0.25, rel=1e-12)
    assert f"{score:.2f}" == "70.41"


def test_moses_bleu_zero_precision_gives_zero():
    # three tokens have no 4-gram: p4 = 0, and the perl script's my_log(0) drives BLEU to exactly 0
    assert moses_bleu(["a b c"], ["a b c"]) == 0.0


def test_moses_bleu_is_case_sensitive_unless_lowercase():
    assert moses_bleu(["A B C D"], ["a b c d"]) == 0.0
    assert moses_bleu(["A B C D"], ["a b c d"], lowercase=True) == 100.0


def test_moses_bleu_splits_on_ascii_whitespace_only_like_perl():
    # perl keeps "a\xa0b" as one token: hyp has 4 tokens [a\xa0b, c, d, e] and its only 4-gram misses the
    # reference "a b c d e", so p4 = 0 and BLEU = 0 (str.split() would see identical sentences: 100)
    assert moses_bleu(["a\u00a0b c d e"], ["a b c d e"]) == 0.0
    # tabs and repeated spaces are ordinary separators
    assert moses_bleu(["a\tb  c d "], ["a b c d"]) == 100.0


def test_moses_bleu_empty_and_mismatched_inputs():
    assert moses_bleu([], []) == 0.0
    assert moses_bleu([""], ["a b c d"]) == 0.0  # perl dies dividing by hyp_len 0
    with pytest.raises(VLMError):
        moses_bleu(["a"], ["a", "b"])


def test_sacre_bleu_agrees_with_moses_on_pretokenized_text():
    # no punctuation, so 13a tokenization changes nothing and every precision is non-zero
    assert sacre_bleu(TWO_HYPS, TWO_REFS) == pytest.approx(moses_bleu(TWO_HYPS, TWO_REFS), rel=1e-9)
    with pytest.raises(VLMError):
        sacre_bleu(["a"], [])


def test_rouge_n_uses_sets_of_ngrams():
    scores = rouge_scores(["the the cat"], ["the cat"])
    # unigram sets {the, cat} == {the, cat}: P = R = 1, F = 2 * 1 / (2 + 1e-8)
    assert scores["rouge1"] == pytest.approx(2 / (2 + 1e-8), rel=1e-12)
    # bigram sets {the the, the cat} vs {the cat}: P = 1/2, R = 1, F = 2 * 0.5 / (1.5 + 1e-8) = 2/3
    assert scores["rouge2"] == pytest.approx(2 / 3, rel=1e-7)
    # LCS 2, R = 2/2, P = 2/3, beta = P/R = 2/3: F = (1 + 4/9) * 1 * 2/3 / (1 + 4/9 * 2/3) = 26/35
    assert scores["rougeL"] == pytest.approx(26 / 35, rel=1e-9)
    assert scores["rouge_mean"] == pytest.approx((scores["rouge1"] + scores["rouge2"] + scores["rougeL"]) / 3)


def test_rouge_splits_on_single_spaces():
    # "a  b".split(" ") == ["a", "", "b"]: unigram set of 3 against {a, b}: P = 2/3, R = 1, F = 0.8
    assert rouge_scores(["a  b"], ["a b"])["rouge1"] == pytest.approx(0.8, rel=1e-7)


def test_rouge_averages_over_examples_and_handles_empty_hypothesis():
    # "" is the single token "": it matches nothing, so the second example scores 0 on every measure
    scores = rouge_scores(["a b", ""], ["a b", "a b"])
    assert scores["rouge1"] == pytest.approx(0.5, rel=1e-7)
    assert scores["rougeL"] == pytest.approx(0.5, rel=1e-9)
    with pytest.raises(VLMError):
        rouge_scores(["a"], [])


def test_unigram_f1_parlai_normalization():
    # "The cat, sat!" -> "cat sat"; "a cat sat down" -> "cat sat down": P = 1, R = 2/3, F1 = 0.8
    assert unigram_f1(["The cat, sat!"], ["a cat sat down"]) == pytest.approx(0.8)
    # ParlAI turns punctuation into a space: "dog's" -> "dog s", so these are identical
    assert unigram_f1(["dog's"], ["dog s"]) == 1.0
    # mean of 1.0 and 0.0 (no overlap)
    assert unigram_f1(["x", "y"], ["x", "z"]) == pytest.approx(0.5)


def test_coqa_normalize_answer():
    # lower -> delete punctuation -> articles become spaces -> collapse whitespace
    assert coqa_normalize_answer("The  Cat's, a hat!") == "cats hat"
    assert coqa_normalize_answer("Theatre") == "theatre"  # \b keeps "the" inside words


def test_coqa_f1_and_exact():
    # gold "red car" vs "car": P = 1, R = 1/2, F1 = 2/3
    assert coqa_f1("red car", "car") == pytest.approx(2 / 3)
    assert coqa_exact("The red car.", "red car") == 1
    # CoQA deletes punctuation: "dog's" -> "dogs", which is not "dog s"
    assert coqa_f1("dog s", "dog's") == 0
    # both sides normalize to nothing -> 1; only one side -> 0
    assert coqa_f1("the", "") == 1
    assert coqa_f1("the", "cat") == 0


def test_coqa_scores_leave_one_out_and_missing_turns():
    gold = {("s1", 1): ["red", "blue"], ("s1", 2): ["red car"], ("s1", 3): ["yes"]}
    predictions = [{"id": "s1", "turn_id": 1, "answer": "red"}, {"id": "s1", "turn_id": 2, "answer": "car"}]
    scores = coqa_scores(predictions, gold)
    # turn 1, two golds: leaving out "red" scores 0 against ["blue"], leaving out "blue" scores 1
    # -> 0.5 for F1 and EM
    # turn 2, one gold: F1 2/3, EM 0; turn 3 has no prediction: 0
    assert scores["turns"] == 3
    assert scores["f1"] == pytest.approx(100 * (0.5 + 2 / 3 + 0) / 3)
    assert scores["em"] == pytest.approx(100 * 0.5 / 3)


def test_coqa_scores_rejects_malformed_prediction():
    with pytest.raises(VLMError):
        coqa_scores([{"id": "s1", "turn_id": 1}], {("s1", 1): ["x"]})


def test_e2e_group_references_keeps_first_seen_order():
    mrs, refs = e2e_group_references(["B", "A", "B", "C", "A"], ["b1", "a1", "b2", "c1", "a2"])
    assert mrs == ["B", "A", "C"]
    assert refs == [["b1", "b2"], ["a1", "a2"], ["c1"]]
    with pytest.raises(VLMError):
        e2e_group_references(["A"], [])


# java=False: these check the Python side (and the approximate METEOR*) without starting Java;
# tests/test_score.py checks the official figures, Java included.
def test_e2e_identical_outputs_with_disjoint_vocabularies():
    scores = e2e_scores(["a b c d", "e f g h"], [["a b c d"], ["e f g h"]], java=False)
    assert scores["BLEU"] == pytest.approx(1.0)
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    # CIDEr-D: every n-gram has df 1 of 2 documents, so idf = log 2 > 0 and each n (1..4) has cosine 1
    # with no length penalty: 10 * mean(1, 1, 1, 1) = 10
    assert scores["CIDEr"] == pytest.approx(10.0)
    # METEOR: 4 exact matches in one chunk: frag = 1/4, penalty 0.5 * (1/4)^3 = 1/128, Fmean = 1
    assert scores["METEOR*"] == pytest.approx(127 / 128)
    assert "METEOR" not in scores


def test_cider_without_four_grams_and_with_shared_ngrams():
    # three-word sentences have no 4-gram: that n contributes 0, so 10 * (1 + 1 + 1 + 0) / 4 = 7.5
    assert e2e_scores(["a b c", "e f g"], [["a b c"], ["e f g"]], java=False)["CIDEr"] == pytest.approx(7.5)
    # n-grams found in every document get idf log(2) - log(2) = 0, so CIDEr is 0 even for exact copies
    assert e2e_scores(["a b c d", "a b c d"], [["a b c d"], ["a b c d"]], java=False)["CIDEr"] == 0.0


def test_e2e_nist_hand_computed():
    # reference "a a b": 3 words, counts a:2, b:1, (a a):1, (a b):1
    # info(a) = log2(3/2), info(b) = log2(3/1), info(a b) = log2(count(a)/count(a b)) = log2(2) = 1
    # hypothesis "a b" hits a, b and (a b): N = (log2 1.5 + log2 3) / 2 + 1 / 1
    # length ratio 2/3 gives the NIST penalty exactly 0.5 (that is how its beta is defined)
    nist = e2e_scores(["a b"], [["a a b"]], java=False)["NIST"]
    assert nist == pytest.approx(0.5 * (math.log2(4.5) / 2 + 1))


def test_e2e_bleu_is_case_insensitive_and_mteval_tokenized():
    # mteval splits off "," and "." and the E2E scorer lowercases, so these are identical
    assert e2e_scores(["The pub, cheap."], [["the pub , cheap ."]], java=False)["BLEU"] == pytest.approx(1.0)
    assert metrics._mteval_tokens('It costs 3.5, OK. "Fine"') == ["it", "costs", "3.5", ",", "ok", ".", '"',
                                                                  "fine", '"']


def test_mteval_lowercases_ascii_only_and_reads_empty_text_as_no_tokens():
    # mteval-v13a's tr/[A-Z]/[a-z]/ leaves other letters alone, so "CAFÉ" never matches "café"
    assert metrics._mteval_tokens("CAFÉ Über") == ["cafÉ", "Über"]
    assert metrics._mteval_tokens(" \t ") == []


def test_mteval_closest_reference_length():
    assert metrics._closest_length([6, 4], 5) == 4  # a tie goes to the shorter
    assert metrics._closest_length([5, 0, 3], 1) == 3  # empty references are skipped
    assert metrics._closest_length([9, 2], 7) == 9


def test_e2e_bleu_smooths_missing_matches_as_mteval():
    # 1-grams 2/4, 2-grams 1/3, no 3-gram (k=1: 1/(2*2)) nor 4-gram (k=2: 1/(4*1)) match
    bleu = e2e_scores(["a b c d"], [["a b x y"]], java=False)["BLEU"]
    assert bleu == pytest.approx((0.5 * (1 / 3) * (1 / 4) * (1 / 4)) ** 0.25)
    # a 2-word output has no 3- or 4-grams: mteval leaves those n out, so an exact copy scores 1
    assert e2e_scores(["a b"], [["a b"]], java=False)["BLEU"] == 1.0


def test_e2e_nist_length_penalty_uses_the_mean_reference_count():
    # references "a b" | "a b", "c d e f g h": 10 words; info(a) = info(b) = log2(10/2), info(a b) = 0.
    # Both outputs "a b" hit a, b, (a b): N = (4 log2 5) / 4 unigrams + 0 = log2 5.
    # mteval's mean reference length is 10 words / (3 references / 2 MRs) = 20/3: ratio 4 / (20/3) = 0.6
    # (pymteval averages per MR, 2 + 8/2 = 6 words: ratio 2/3 and a penalty of exactly 0.5)
    nist = e2e_scores(["a b", "a b"], [["a b"], ["a b", "c d e f g h"]], java=False)["NIST"]
    beta = math.log(2) / math.log(1.5) ** 2
    assert nist == pytest.approx(math.log2(5) * math.exp(-beta * math.log(0.6) ** 2))


def test_coco_rouge_l_takes_max_precision_and_recall_separately():
    # hyp "a b c": vs "a b" LCS 2 (P 2/3, R 1); vs "b c d e" LCS 2 (P 2/3, R 1/2)
    # max P = 2/3, max R = 1: F = (1 + 1.44) * (2/3) * 1 / (1 + 1.44 * 2/3) = 4.88 / 5.88
    assert e2e_scores(["a b c"], [["a b", "b c d e"]], java=False)["ROUGE_L"] == pytest.approx(4.88 / 5.88)


def test_coco_tokens_emulate_stanford_ptb():
    # what pycocoevalcap's PTBTokenizer -lowerCase gives, minus its punctuation list
    tokens = metrics._coco_tokens("Cocum's price is £20-25. It's kid-friendly.")
    assert tokens == ["cocum", "'s", "price", "is", "#", "20-25", "it", "'s", "kid-friendly"]
    # brackets come out as -lrb- etc., which pycocoevalcap keeps (its list has only "-LRB-")
    assert metrics._coco_tokens("Aromi (coffee shop) [x]") == ["aromi", "-lrb-", "coffee", "shop", "-rrb-",
                                                                "-lsb-", "x", "-rsb-"]


def test_meteor_stem_matching():
    # Porter: cats -> cat, running -> run: 2 matches in 1 chunk, frag 1/2, penalty 0.5/8: 15/16
    assert e2e_scores(["cats running"], [["cat run"]], java=False)["METEOR*"] == pytest.approx(15 / 16)


class _NoWordNet:
    """Stand-in for nltk's WordNet (its data cannot be downloaded here): no synonyms."""

    @staticmethod
    def synsets(word):
        return []


@pytest.mark.parametrize("hypothesis, reference", [
    ("the cat sat on the mat", "on the mat sat the cat"),
    ("cats are running fast near the river", "a cat runs quickly by rivers"),
    ("the the the", "the cat the"),
    ("x y", "z"),
])
def test_meteor_matches_nltk_without_wordnet(hypothesis, reference):
    expected = single_meteor_score(reference.split(), hypothesis.split(), wordnet=_NoWordNet())
    assert metrics._meteor_single(hypothesis.split(), reference.split()) == pytest.approx(expected, rel=1e-12)


def test_e2e_scores_rejects_bad_references():
    with pytest.raises(VLMError):
        e2e_scores(["a"], ["a"])  # a string, not a list of references
    with pytest.raises(VLMError):
        e2e_scores(["a"], [[]])


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(10.0)) == pytest.approx(10.0)
