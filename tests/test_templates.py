"""tasks/template.py: hand-written ids of template examples (virtual tokens per split, labels,
truncation), the JSON-lines reader, records of a task, split files and the stop rule."""
import dataclasses
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.task_file import load_task_file
from tasks.template import (
    EOS_ID,
    NO_SEGMENT,
    VIRTUAL_PLACEHOLDER_ID,
    ExampleTooLong,
    build_template_example,
    cut_at_stop,
    read_jsonl,
    template_records,
    user_task_split_path,
)
from utils.errors import VLMError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = load_task_file(os.path.join(REPO, "data", "tasks", "nemo_article.json"))
SENTIMENT, ASSISTANT = TASKS["sentiment"], TASKS["intent_and_slot"]
V, X = VIRTUAL_PLACEHOLDER_ID, -100

# PhraseBank Sentences_AllAgree.txt line 29 (tests/fixtures/user_tasks/phrasebank_allagree.txt)
SENTENCE = {"taskname": "sentiment", "sentence": "Sales have risen in other export markets .",
            "label": "positive"}
# NLU-Evaluation-Data assistant_train.csv line 4192, as `prepare.py assistant` converts it
UTTERANCE = {"taskname": "intent_and_slot", "utterance": "please activate my coffee pot for me",
             "label": "Intent: iot_coffee\nSlots: device_type(coffee pot)"}

# GPT-2 BPE of the sentence: every word is one token with its leading space (Ġ), " ." too:
#   ĠSales 17329, Ġhave 423, Ġrisen 17450, Ġin 287, Ġother 584, Ġexport 10784, Ġmarkets 5939, Ġ. 764
# then the literal " sentiment:" -> Ġsentiment 15598, ":" 25 (its trailing space moved into the label),
# the label " positive" -> Ġpositive 3967, and <|endoftext|> 50256.
SENTENCE_IDS = [17329, 423, 17450, 287, 584, 10784, 5939, 764]
SENTIMENT_IDS = [V] * 10 + SENTENCE_IDS + [15598, 25, 3967, EOS_ID]


def enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_the_constants():
    assert (VIRTUAL_PLACEHOLDER_ID, NO_SEGMENT, EOS_ID) == (50257, -1, 50256)


# ---- the sentiment record -----------------------------------------------------------------------


def test_sentiment_example_by_hand(tokenizer):
    example = build_template_example(SENTIMENT, SENTENCE, tokenizer)
    assert set(example) == {"input_ids", "token_type_ids", "labels", "virtual_ids"}
    assert example["input_ids"] == SENTIMENT_IDS
    # the same ids from the tokenizer, piece by piece (the whitespace rule: " sentiment:" + " positive")
    assert example["input_ids"] == [V] * 10 + enc(tokenizer, " " + SENTENCE["sentence"]) \
        + enc(tokenizer, " sentiment:") + enc(tokenizer, " positive") + [EOS_ID]
    assert example["virtual_ids"] == list(range(10)) + [-1] * 12
    assert example["token_type_ids"] == [NO_SEGMENT] * 22
    # answer_only_loss: only the answer and the EOS are targets
    assert example["labels"] == [X] * 20 + [3967, EOS_ID]


def test_sentiment_decoding_prompt_stops_where_the_answer_begins(tokenizer):
    example = build_template_example(SENTIMENT, {"sentence": SENTENCE["sentence"]}, tokenizer,
                                     with_answer=False)
    assert example["input_ids"] == [V] * 10 + SENTENCE_IDS + [15598, 25]
    assert example["labels"] == [X] * 20
    assert example["virtual_ids"] == list(range(10)) + [-1] * 10
    assert example["token_type_ids"] == [NO_SEGMENT] * 20


def test_without_answer_only_loss_every_real_token_is_a_target(tokenizer):
    task = dataclasses.replace(SENTIMENT, answer_only_loss=False)
    example = build_template_example(task, SENTENCE, tokenizer)
    assert example["labels"] == [X] * 10 + SENTIMENT_IDS[10:]
    # a template starting with text: its first token has nothing before it to predict it
    task = dataclasses.replace(task, parts=(("text", "Review:"), ("virtual", 0), ("text", " "),
                                            ("field", "sentence"), ("text", " sentiment: "),
                                            ("field", "label")))
    example = build_template_example(task, SENTENCE, tokenizer)
    review = enc(tokenizer, "Review:")
    assert review == [14832, 25]
    assert example["input_ids"] == review + SENTIMENT_IDS
    assert example["labels"] == [X, 25] + [X] * 10 + SENTIMENT_IDS[10:]
    assert example["virtual_ids"] == [-1, -1] + list(range(10)) + [-1] * 12


def test_truncation_cuts_the_truncate_field_only(tokenizer):
    # 22 tokens; a limit of 20 takes the sentence's last two tokens (Ġmarkets Ġ.) and nothing else
    task = dataclasses.replace(SENTIMENT, max_seq_length=20)
    example = build_template_example(task, SENTENCE, tokenizer)
    assert example["input_ids"] == [V] * 10 + SENTENCE_IDS[:6] + [15598, 25, 3967, EOS_ID]
    assert example["labels"] == [X] * 18 + [3967, EOS_ID]
    assert example["virtual_ids"] == list(range(10)) + [-1] * 10
    # decoding leaves max_answer_tokens for the answer: 20 - 2 = 18 for the prompt, the same cut
    task = dataclasses.replace(task, max_answer_tokens=2)
    prompt = build_template_example(task, SENTENCE, tokenizer, with_answer=False)
    assert prompt["input_ids"] == [V] * 10 + SENTENCE_IDS[:6] + [15598, 25]


def test_truncation_keeps_one_token_or_gives_up(tokenizer):
    # everything but the sentence is 10 + 2 + 2 = 14 tokens: 15 keeps one sentence token, 14 cannot fit
    task = dataclasses.replace(SENTIMENT, max_seq_length=15)
    assert (build_template_example(task, SENTENCE, tokenizer)["input_ids"]
            == [V] * 10 + [17329, 15598, 25, 3967, EOS_ID])
    task = dataclasses.replace(SENTIMENT, max_seq_length=14)
    with pytest.raises(ExampleTooLong) as caught:
        build_template_example(task, SENTENCE, tokenizer)
    assert str(caught.value) == ("task 'sentiment': the example has 22 tokens, over max_seq_length 14, "
                                 "even with its truncate_field 'sentence' cut to one token")
    assert (caught.value.length, caught.value.limit) == (22, 14)
    assert isinstance(caught.value, VLMError)


def test_special_token_text_in_a_field_is_plain_text(tokenizer):
    record = {"sentence": "<|endoftext|> <pad>", "label": "neutral"}
    ids = build_template_example(SENTIMENT, record, tokenizer)["input_ids"]
    assert ids[10:-4] == enc(tokenizer, " <|") + enc(tokenizer, "endoftext|> <") + enc(tokenizer, "pad>")
    assert ids.count(EOS_ID) == 1 and ids.count(V) == 10


def test_whitespace_after_the_answer_is_dropped(tokenizer):
    task = dataclasses.replace(SENTIMENT, parts=SENTIMENT.parts + (("text", " \n"),))
    assert build_template_example(task, SENTENCE, tokenizer)["input_ids"] == SENTIMENT_IDS


def test_record_fields_are_checked(tokenizer):
    with pytest.raises(VLMError) as caught:
        build_template_example(SENTIMENT, {"label": "positive"}, tokenizer)
    assert str(caught.value) == "task 'sentiment': the record has no field 'sentence'"
    with pytest.raises(VLMError) as caught:
        build_template_example(SENTIMENT, {"sentence": "a", "label": 1}, tokenizer)
    assert str(caught.value) == "task 'sentiment': field 'label' must be a string, got a number"


# ---- the assistant record -----------------------------------------------------------------------

# " Predict intent and slot " (before marker 1, tokenized as it is: its last space stays a token)
PREDICT = [49461, 6824, 290, 10852, 220]         # ĠPredict Ġintent Ġand Ġslot Ġ
# " :\n" before {utterance}: " :" 1058; the "\n" moves into the utterance, which starts at a line
UTTERANCE_IDS = [198, 29688, 15155, 616, 6891, 1787, 329, 502]  # Ċ please Ġactivate Ġmy Ġcoffee Ġpot Ġfor Ġme
# "\n" before {label} moves into the label:
# Ċ Int ent : Ġi ot _ co ffee Ċ Sl ots : Ġdevice _ type ( co ffee Ġpot )
LABEL_IDS = [198, 5317, 298, 25, 1312, 313, 62, 1073, 5853, 198, 11122, 1747, 25, 3335, 62, 4906, 7, 1073,
             5853, 1787, 8]


def test_assistant_example_by_hand(tokenizer):
    example = build_template_example(ASSISTANT, UTTERANCE, tokenizer)
    expected = [V] * 7 + PREDICT + [V] * 3 + [1058] + UTTERANCE_IDS + LABEL_IDS + [EOS_ID]
    assert example["input_ids"] == expected
    assert example["input_ids"] == [V] * 7 + enc(tokenizer, " Predict intent and slot ") + [V] * 3 \
        + enc(tokenizer, " :") + enc(tokenizer, "\n" + UTTERANCE["utterance"]) \
        + enc(tokenizer, "\n" + UTTERANCE["label"]) + [EOS_ID]
    # splits [7, 3]: virtual tokens 0..6 at marker 0, 7..9 at marker 1
    assert example["virtual_ids"] == list(range(7)) + [-1] * 5 + [7, 8, 9] + [-1] * 31
    assert example["token_type_ids"] == [NO_SEGMENT] * 46
    # the article's intent_and_slot trains on every real token; virtual positions never
    assert example["labels"] == [X] * 7 + PREDICT + [X] * 3 + expected[15:]


def test_assistant_answer_only_loss_and_prompt(tokenizer):
    task = dataclasses.replace(ASSISTANT, answer_only_loss=True)
    example = build_template_example(task, UTTERANCE, tokenizer)
    assert example["labels"] == [X] * 24 + LABEL_IDS + [EOS_ID]
    prompt = build_template_example(task, UTTERANCE, tokenizer, with_answer=False)
    assert prompt["input_ids"] == example["input_ids"][:24]
    assert prompt["virtual_ids"] == example["virtual_ids"][:24]
    assert prompt["labels"] == [X] * 24


def test_no_truncate_field_too_long_is_an_error(tokenizer):
    task = dataclasses.replace(ASSISTANT, max_seq_length=40)
    with pytest.raises(ExampleTooLong) as caught:
        build_template_example(task, UTTERANCE, tokenizer)
    assert str(caught.value) == ("task 'intent_and_slot': the example has 46 tokens, over max_seq_length 40, "
                                 "and the task has no truncate_field")
    task = dataclasses.replace(task, max_answer_tokens=20)  # the 24-token prompt gets 40 - 20 = 20
    with pytest.raises(ExampleTooLong) as caught:
        build_template_example(task, UTTERANCE, tokenizer, with_answer=False)
    assert str(caught.value) == ("task 'intent_and_slot': the prompt has 24 tokens, over the 20 that "
                                 "max_seq_length 40 leaves after max_answer_tokens 20, "
                                 "and the task has no truncate_field")
    assert (caught.value.length, caught.value.limit) == (24, 20)


# ---- JSON lines ---------------------------------------------------------------------------------


def write(tmp_path, content, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def test_read_jsonl_numbers_lines_and_skips_blank_ones(tmp_path):
    # BOM, CRLF, U+2028 in a string
    path = write(tmp_path, b'\xef\xbb\xbf{"a": 1}\r\n\n  \n{"b": "x\xe2\x80\xa8y"}\n')
    assert read_jsonl(path) == [(1, {"a": 1}), (4, {"b": "x\u2028y"})]


@pytest.mark.parametrize("content, message", [
    (b'{"a": 1}\n{"a": 1 "b": 2}\n', "line 2: invalid JSON at column 9: Expecting ',' delimiter"),
    (b'{"a": 1}\n\n[1, 2]\n', "line 3: expected a JSON object, got a list"),
    (b'"text"\n', "line 1: expected a JSON object, got a string"),
    (b'{"a": "ok"}\n{"a": "caf\xe9"}\n', "line 2: not UTF-8 text (byte 10 of the line)"),
    (b'{"a": "\\ud800"}\n', "line 1: the string '\\ud800' holds a lone surrogate escape (such as \\ud800): "
                            "not valid Unicode text"),
    (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", "line 1: JSON nested too deeply"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(VLMError) as caught:
        read_jsonl(path)
    assert str(caught.value) == f"{path}, {message}"


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(VLMError) as caught:
        read_jsonl(str(tmp_path / "none.jsonl"))
    assert str(caught.value) == f"{tmp_path / 'none.jsonl'}: file not found"


MIXED = "\n".join(json.dumps(r) for r in [
    SENTENCE, UTTERANCE, {"taskname": "other", "whatever": 1},
    {"taskname": "sentiment", "sentence": "Profit fell .", "label": "negative", "id": 7}]) + "\n"


def test_template_records_of_one_task_in_a_mixed_file(tmp_path):
    path = write(tmp_path, MIXED)
    assert template_records(SENTIMENT, path) == [
        (1, SENTENCE),
        (4, {"taskname": "sentiment", "sentence": "Profit fell .", "label": "negative", "id": 7})]
    assert template_records(ASSISTANT, path) == [(2, UTTERANCE)]
    # (line, object) pairs work too, named by `source`
    assert template_records(ASSISTANT, [(9, UTTERANCE)], source="<stdin>") == [(9, UTTERANCE)]


@pytest.mark.parametrize("record, message", [
    ({"sentence": "a", "label": "b"}, 'line 2: no "taskname" (each record names its task)'),
    ({"taskname": 3, "sentence": "a"}, 'line 2: "taskname" must be a string, got a number'),
    ({"taskname": "sentiment", "label": "b"},
     "line 2: task 'sentiment': missing field 'sentence' of the template"),
    ({"taskname": "sentiment", "sentence": "a"},
     "line 2: task 'sentiment': missing field 'label' of the template"),
    ({"taskname": "sentiment", "sentence": "a", "label": ["b"]},
     "line 2: task 'sentiment': field 'label' must be a string, got a list"),
])
def test_template_record_errors_name_file_and_line(tmp_path, record, message):
    path = write(tmp_path, json.dumps(SENTENCE) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(VLMError) as caught:
        template_records(SENTIMENT, path)
    assert str(caught.value) == f"{path}, {message}"


def test_template_records_answer_optional_and_none_found(tmp_path):
    assert template_records(SENTIMENT, [(1, {"taskname": "sentiment", "sentence": "a"})],
                            require_answer=False) == \
        [(1, {"taskname": "sentiment", "sentence": "a"})]
    # another task's records are not checked against this task's template
    path = write(tmp_path, json.dumps({"taskname": "intent_and_slot"}) + "\n")
    with pytest.raises(VLMError) as caught:
        template_records(SENTIMENT, path)
    assert str(caught.value) == f"{path}: no records of task 'sentiment' (tasks in it: intent_and_slot)"


def test_user_task_split_path(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    assert user_task_split_path(str(tmp_path), "train") == str(tmp_path / "train.jsonl")
    messages = {}
    for folder, split in [(tmp_path, "valid"), (tmp_path / "nope", "train"),
                          (tmp_path / "train.jsonl", "train"), (tmp_path, "dev")]:
        with pytest.raises(VLMError) as caught:
            user_task_split_path(str(folder), split)
        messages[split if folder == tmp_path else folder.name] = str(caught.value)
    assert messages == {
        "valid": f"{tmp_path}: no valid.jsonl (the valid split this command reads)",
        "nope": f"{tmp_path / 'nope'}: dataset folder not found (a user task's dataset is a folder holding "
                "train.jsonl, valid.jsonl, test.jsonl)",
        "train.jsonl": f"{tmp_path / 'train.jsonl'}: not a folder (a user task's dataset is a folder holding "
                       "train.jsonl, valid.jsonl, test.jsonl)",
        "dev": "unknown split 'dev' (a user task has train, valid, test)",
    }


# ---- the stop rule ------------------------------------------------------------------------------


def test_stop_rule():
    assert SENTIMENT.stop_ids() == ASSISTANT.stop_ids() == (EOS_ID,)
    assert cut_at_stop(" positive\nnegative", SENTIMENT) == "positive"
    # leading whitespace is the template's, skipped
    assert cut_at_stop("\n neutral \n", SENTIMENT) == "neutral"
    assert cut_at_stop(" no stop here ", SENTIMENT) == "no stop here"
    # no stop strings (its label spans two lines): only stripped
    assert cut_at_stop("\nIntent: iot_coffee\nSlots: None\n", ASSISTANT) == "Intent: iot_coffee\nSlots: None"
    # the earliest of several stop strings
    task = dataclasses.replace(SENTIMENT, stop=("\n", "."))
    assert cut_at_stop(" up. down\n", task) == "up"
    assert cut_at_stop(" up\n. down", task) == "up"


# ---- any record: ExampleTooLong or a well-formed example whose prompt is its prefix ---------------

texts = st.one_of(st.text(max_size=30), st.sampled_from([
    "", " ", "\n", "  x  ", "<|endoftext|>", "<pad>", "<|VIRTUAL_PROMPT_0|>", "{label}",
    "\u00e9t\u00e9 \U0001f600"]))


@settings(max_examples=80, deadline=None, database=None)
@given(first=texts, answer=texts, max_seq_length=st.integers(12, 60), task_name=st.sampled_from(list(TASKS)),
       answer_only_loss=st.booleans())
def test_any_record_gives_a_well_formed_example(tokenizer, first, answer, max_seq_length, task_name,
                                                answer_only_loss):
    task = dataclasses.replace(TASKS[task_name], max_seq_length=max_seq_length, max_answer_tokens=2,
                               answer_only_loss=answer_only_loss)
    record = dict(zip(task.fields, (first, answer)))
    try:
        example = build_template_example(task, record, tokenizer)
    except ExampleTooLong as caught:
        assert caught.length > caught.limit == max_seq_length
        return
    ids, labels, virtual = example["input_ids"], example["labels"], example["virtual_ids"]
    assert len(ids) == len(labels) == len(virtual) == len(example["token_type_ids"]) <= max_seq_length
    assert set(example["token_type_ids"]) == {NO_SEGMENT}
    assert [v for v in virtual if v >= 0] == list(range(task.total_virtual_tokens))
    assert all((i == V) == (v >= 0) for i, v in zip(ids, virtual))  # placeholders just at virtual tokens
    assert all(label in (X, i) for label, i in zip(labels, ids)) and labels[0] == X
    assert all(label == X for label, v in zip(labels, virtual) if v >= 0)
    assert ids[-1] == labels[-1] == EOS_ID and ids.count(EOS_ID) == 1
    try:
        prompt = build_template_example(task, record, tokenizer, with_answer=False)
    except ExampleTooLong:
        return
    if len(ids) < max_seq_length and len(prompt["input_ids"]) + 2 < max_seq_length:  # neither was cut
        cut = len(prompt["input_ids"])
        assert ids[:cut] == prompt["input_ids"] and virtual[:cut] == prompt["virtual_ids"]
        targets = [label for label in labels if label != X]
        if answer_only_loss:  # the targets are exactly what follows the decoding prompt
            assert targets == ids[cut:]
        else:
            assert targets == [i for i, v in zip(ids[1:], virtual[1:]) if v < 0]


lines = st.lists(st.one_of(st.binary(max_size=12), st.sampled_from([
    b'{"taskname": "sentiment", "sentence": "a", "label": "b"}', b'{"taskname": "sentiment"}', b"[]", b"{",
    b'{"taskname": 1}', b'{"a": "\\ud800"}', b"\xff", b"\xef\xbb\xbf{}", b"\r", b"  "])), max_size=5)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("any_jsonl")


@settings(max_examples=80, deadline=None, database=None)
@given(content=lines)
def test_any_jsonl_file_gives_records_or_an_error_naming_it(workdir, content):
    path = os.path.join(workdir, "any.jsonl")
    with open(path, "wb") as f:
        f.write(b"\n".join(content))
    try:
        records = template_records(SENTIMENT, path)
    except VLMError as caught:
        assert str(caught).startswith(path)
        return
    assert records and all(isinstance(n, int) and r["taskname"] == "sentiment"
                           and isinstance(r["sentence"], str)
                           for n, r in records)
