"""Metrics of user tasks (utils.metrics): label accuracy with a label map, intent/slot scores,
exact match and token F1, on hand-computed cases (each worked out in the comments)."""
import pytest

from utils.errors import VLMError
from utils.metrics import (
    apply_label_map,
    exact_match,
    intent_slot_scores,
    label_accuracy,
    normalize_label,
    parse_intent_slots,
    token_f1,
)

SWEDISH = {"negativt": "negative", "Positiv": "positive"}


def test_labels_are_compared_stripped_with_one_space_and_lowercased():
    assert normalize_label(" Very  Good\n") == "very good"
    # the map's variants are matched normalized too, and its labels come out normalized
    assert apply_label_map(["NEGATIVT ", "positiv", "neutral", "pos"], SWEDISH) == \
        ["negative", "positive", "neutral", "pos"]


def test_label_accuracy_maps_both_sides():
    predictions = [" positive", "Negativt", "neutral", "positive"]
    references = ["positive", "negative", "positive", "Positiv"]
    # mapped: (positive, positive) yes, (negative, negative) yes, (neutral, positive) no,
    # (positive, positive) yes
    assert label_accuracy(predictions, references, SWEDISH) == 0.75
    # unmapped: only the first pair agrees once normalized
    assert label_accuracy(predictions, references) == 0.25
    assert label_accuracy([], []) == 0.0
    with pytest.raises(VLMError, match="^2 predictions but 1 references$"):
        label_accuracy(["a", "b"], ["a"])


def test_exact_match_strips_the_ends_only():
    # "a b" == "a b"; " A b" differs in case; "a  b" in inner spacing: 1 of 3
    assert exact_match(["a b", " A b", "a  b"], ["a b\n", "a b", "a b"]) == pytest.approx(1 / 3)
    with pytest.raises(VLMError):
        exact_match(["a"], [])


def test_token_f1_squad_style():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]: P 1, R 2/3, F1 0.8
    # "" vs "": both empty, 1.0; "" vs "x": 0.0; mean (0.8 + 1 + 0) / 3 = 0.6
    assert token_f1(["the cat sat", "", ""], ["a cat sat down", "", "x"]) == pytest.approx(0.6)
    # punctuation is deleted and case ignored before counting
    assert token_f1(["Cat, sat!"], ["cat sat"]) == 1.0


@pytest.mark.parametrize("text, parsed", [
    ("Intent: iot_coffee\nSlots: device_type(coffee pot)", ("iot_coffee", [("device_type", "coffee pot")])),
    ("Intent: general_affirm\nSlots: None", ("general_affirm", [])),
    ("  Intent:  alarm_remove \n Slots:  time ( four am ) ,time(ten pm)  ",
     ("alarm_remove", [("time", "four am"), ("time", "ten pm")])),
    ("Intent: email_sendemail\nSlots: person(robert, jr)", ("email_sendemail", [("person", "robert, jr")])),
    ("Intent: x\nSlots: a(b), ", None),     # a trailing comma
    ("Intent: x\nSlots: a(b) c(d)", None),  # no comma between pairs
    ("Intent: x\nSlots: a(b", None),        # unclosed bracket
    ("Intent: x\nSlots: ", None),           # nothing after Slots:
    ("Intent: x", None),                    # no Slots line
    ("x\nSlots: None", None),
    ("Intent: x\nSlots: None\nIntent: y", None),
])
def test_parse_intent_slots(text, parsed):
    assert parse_intent_slots(text) == parsed


def test_intent_slot_scores_by_hand():
    references = [
        "Intent: iot_coffee\nSlots: device_type(coffee pot)",
        "Intent: alarm_remove\nSlots: time(four am), time(ten pm)",
        "Intent: general_affirm\nSlots: None",
        "Intent: calendar_set\nSlots: event_name(baseball practice), time(five pm), timeofday(tonight)",
    ]
    predictions = [
        "Intent: iot_coffee\nSlots: device_type(coffee pot)",          # intent right; 1 pair, 1 right
        "Intent: alarm_set\nSlots: time(four am), time(four am)",      # intent wrong; 2 pairs, 1 right
                                                                       # (multiset)
        "Intent: general_affirm\nSlots: date(today)",                  # intent right; 1 pair, 0 right
        "Intent: calendar_set\nSlots: event_name(baseball practice",   # does not parse: wrong, no pairs
    ]
    # intent 2/4; predicted pairs 4, reference pairs 6, right 2: P 1/2, R 1/3,
    # F1 2PR/(P+R) = (1/3)/(5/6) = 0.4
    assert intent_slot_scores(predictions, references) == pytest.approx(
        {"intent_accuracy": 0.5, "slot_precision": 0.5, "slot_recall": 1 / 3, "slot_f1": 0.4})


def test_intent_slot_pairs_count_as_multisets():
    # a pair given twice and predicted twice is 2 right of 2; predicted once, 1 right of 2
    twice = "Intent: alarm_set\nSlots: time(six am), time(six am)"
    assert intent_slot_scores([twice], [twice]) == {
        "intent_accuracy": 1.0, "slot_precision": 1.0, "slot_recall": 1.0, "slot_f1": 1.0}
    assert intent_slot_scores(["Intent: alarm_set\nSlots: time(six am)"], [twice]) == pytest.approx(
        {"intent_accuracy": 1.0, "slot_precision": 1.0, "slot_recall": 0.5, "slot_f1": 2 / 3})


def test_intent_slot_values_compare_exactly_and_empty_ratios_are_zero():
    reference = ["Intent: iot_coffee\nSlots: device_type(coffee pot)"]
    assert intent_slot_scores(["Intent: iot_coffee\nSlots: Device_type(Coffee pot)"], reference) == {
        "intent_accuracy": 1.0, "slot_precision": 0.0, "slot_recall": 0.0, "slot_f1": 0.0}
    # no pairs on either side: nothing to divide by, 0.0 (as scikit-learn's zero_division=0)
    assert intent_slot_scores(["Intent: a\nSlots: None"], ["Intent: a\nSlots: None"]) == {
        "intent_accuracy": 1.0, "slot_precision": 0.0, "slot_recall": 0.0, "slot_f1": 0.0}
    assert intent_slot_scores([], []) == {
        "intent_accuracy": 0.0, "slot_precision": 0.0, "slot_recall": 0.0, "slot_f1": 0.0}


def test_an_unparsable_reference_is_an_error():
    with pytest.raises(VLMError) as caught:
        intent_slot_scores(["Intent: a\nSlots: None"] * 2, ["Intent: a\nSlots: None", "iot_coffee"])
    assert str(caught.value) == "reference 1: cannot parse 'iot_coffee' as 'Intent: X\\nSlots: a(b), ...'"
