"""data/prepare.py assistant / sentiment: the converters on real slices (tests/fixtures/user_tasks),
their errors, the folds and train fractions, the command line and the shipped samples."""
import csv
import fractions
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "user_tasks")
SCRIPT = os.path.join(REPO, "data", "prepare.py")

_spec = importlib.util.spec_from_file_location("prepare", SCRIPT)
prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare)
from tasks.task_file import load_task_file  # noqa: E402
from tasks.template import build_template_example, template_records  # noqa: E402
from utils.errors import VLMError  # noqa: E402

HEADER = "answerid;scenario;intent;answer_annotation;answer_from_anno;answer_from_user\n"


def fixture(name):
    return os.path.join(FIXTURES, name)


def write(tmp_path, name, content):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return str(path)


def error(call, *args):
    with pytest.raises(VLMError) as caught:
        call(*args)
    return str(caught.value)


# ---- sentiment: Financial PhraseBank ------------------------------------------------------------


def test_phrasebank_lines_to_records():
    records = prepare.read_phrasebank(fixture("phrasebank_allagree.txt"))
    assert len(records) == 48
    assert records[0] == {"taskname": "sentiment", "label": "neutral", "sentence": (
        "According to Gran , the company has no plans to move all production to Russia , "
        "although that is where the company is growing .")}
    assert records[28] == {"taskname": "sentiment", "sentence": "Sales have risen in other export markets .",
                           "label": "positive"}
    assert [r["label"] for r in records].count("negative") == 3
    assert records[6]["sentence"].startswith("Clothing retail chain Sepp+\u00f1l+\u00f1 's sales increased")
    # the original release's Latin-1 gives the same records
    assert prepare.read_phrasebank(fixture("phrasebank_allagree_latin1.txt")) == records


def test_phrasebank_splits_at_the_last_at_sign_and_checks_labels(tmp_path):
    path = write(tmp_path, "p.txt", "Write to ir@example.com .@neutral\r\n\nProfit rose .@ positive \n")
    assert prepare.read_phrasebank(path) == [
        {"taskname": "sentiment", "sentence": "Write to ir@example.com .", "label": "neutral"},
        {"taskname": "sentiment", "sentence": "Profit rose .", "label": "positive"}]
    assert error(prepare.read_phrasebank, write(tmp_path, "q.txt", "a .@neutral\nb .@positve\n")) == \
        f"{tmp_path}/q.txt, line 2: unknown label 'positve' (expected positive, negative or neutral)"
    assert error(prepare.read_phrasebank, write(tmp_path, "r.txt", "no label here\n")) == \
        f"{tmp_path}/r.txt, line 1: expected sentence@label"
    assert error(prepare.read_phrasebank, write(tmp_path, "s.txt", "a .@neutral\n @negative\n")) == \
        f"{tmp_path}/s.txt, line 2: empty sentence"
    assert error(prepare.read_phrasebank, str(tmp_path / "none.txt")) == \
        f"{tmp_path}/none.txt: cannot read: No such file or directory"


# ---- assistant: NLU-Evaluation-Data ---------------------------------------------------------------


def test_assistant_csv_rows_to_intent_and_slot_records():
    records, skipped = prepare.read_assistant_csv(fixture("assistant_train.csv"))
    assert (len(records), skipped) == (34, 0)
    by_utterance = {r["utterance"]: r for r in records}
    assert by_utterance["please activate my coffee pot for me"] == {
        "taskname": "intent_and_slot", "utterance": "please activate my coffee pot for me",
        "label": "Intent: iot_coffee\nSlots: device_type(coffee pot)"}
    assert by_utterance["i need a drink"]["label"] == "Intent: iot_coffee\nSlots: None"
    assert by_utterance["cancel the alarm at four am ten pm"]["label"] == \
        "Intent: alarm_remove\nSlots: time(four am), time(ten pm)"
    assert by_utterance["add event baseball practice five pm tonight"]["label"] == \
        "Intent: calendar_set\nSlots: event_name(baseball practice), time(five pm), timeofday(tonight)"
    # a slot right before a comma: no space is added
    assert "send email to robert, what time is dinner" in by_utterance
    # the utterance is exactly answer_from_anno on every real row
    with open(fixture("assistant_train.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    assert [r["utterance"] for r in records] == [row["answer_from_anno"] for row in rows]
    assert len({r["label"].split("\n")[0] for r in records}) == 28


@pytest.mark.parametrize("annotation, message", [
    ("wake me [time : five am", "unclosed '[' in the annotation 'wake me [time : five am'"),
    ("wake me time : five am]",
     "']' without '[' at character 22 of the annotation 'wake me time : five am]'"),
    ("wake [time : [x : five] am]",
     "nested '[' at character 13 of the annotation 'wake [time : [x : five] am]'"),
    ("wake me [five am]", "slot '[five am]' is not [name : value]"),
    ("wake me [time : ]", "slot '[time : ]' is not [name : value]"),
    ("wake me [ : five am]", "slot '[ : five am]' is not [name : value]"),
    ("wake me [time : five (am)]",
     "slot '[time : five (am)]' holds '(' or ')', which the label's name(value) pairs cannot hold"),
])
def test_annotation_errors(annotation, message):
    assert error(prepare.parse_annotation, annotation, "here") == f"here: {message}"


def test_annotation_spacing_is_normalized():
    assert prepare.parse_annotation("  set  [ time :five  am ]alarm ", "here") == \
        ("set five amalarm", [("time", "five am")])
    assert prepare.parse_annotation("[date : today] [date : tomorrow]", "here") == \
        ("today tomorrow", [("date", "today"), ("date", "tomorrow")])


def test_assistant_csv_errors_name_file_and_line(tmp_path):
    path = write(tmp_path, "a.csv",
                 HEADER + '1;alarm;set;"wake me";"wake me";"Wake me"\n2;alarm;set;"x";"x"\n')
    assert error(prepare.read_assistant_csv, path) == f"{path}, line 3: 5 fields where the header has 6"
    path = write(tmp_path, "b.csv", "answerid;scenario;intent;answer\n1;a;b;c\n")
    assert error(prepare.read_assistant_csv, path) == (
        f"{path}, line 1: the header lacks answer_annotation, answer_from_anno, answer_from_user "
        "(expected answerid;scenario;intent;answer_annotation;answer_from_anno;answer_from_user)")
    path = write(tmp_path, "c.csv", HEADER + '1;alarm;set;"wake me [time : six";"wake me six";"x"\n')
    assert error(prepare.read_assistant_csv, path) == \
        f"{path}, line 2: unclosed '[' in the annotation 'wake me [time : six'"
    path = write(tmp_path, "d.csv", HEADER + '1; ;set;"wake me";"wake me";"x"\n')
    assert error(prepare.read_assistant_csv, path) == f"{path}, line 2: empty scenario or intent"
    assert error(prepare.read_assistant_csv, write(tmp_path, "e.csv", "")) == \
        f"{tmp_path}/e.csv: empty file (expected the header " \
        "answerid;scenario;intent;answer_annotation;answer_from_anno;answer_from_user)"


def test_rows_without_annotation_are_skipped_and_counted(tmp_path):
    path = write(tmp_path, "a.csv", HEADER + '1;alarm;set;"";"";"Wake me up"\n\n'
                                             '2;alarm;set;"wake me [time : at six]";"wake me at six";"x"\n'
                                             '3;alarm;set;"  ";"";"Wake me"\n')
    records, skipped = prepare.read_assistant_csv(path)
    assert records == [{"taskname": "intent_and_slot", "utterance": "wake me at six",
                        "label": "Intent: alarm_set\nSlots: time(at six)"}]
    assert skipped == 2


# ---- folds and train fractions --------------------------------------------------------------------

RECORDS = [{"id": i} for i in range(23)]


def ids(records):
    return [r["id"] for r in records]


def test_folds_partition_the_data_and_valid_is_the_next_fold():
    splits = [prepare.fold_split(RECORDS, folds=5, fold=i, seed=7) for i in range(5)]
    tests = [ids(s["test"]) for s in splits]
    assert sorted(sum(tests, [])) == list(range(23))  # each record is in exactly one test fold
    assert sorted(len(t) for t in tests) == [4, 4, 5, 5, 5]
    for i, split in enumerate(splits):
        assert list(split) == ["train", "valid", "test"]
        assert ids(split["valid"]) == tests[(i + 1) % 5]
        assert sorted(ids(split["train"]) + ids(split["valid"]) + ids(split["test"])) == list(range(23))
    # the same seed gives the same split; another seed another one
    assert prepare.fold_split(RECORDS, folds=5, fold=2, seed=7) == splits[2]
    assert prepare.fold_split(RECORDS, folds=5, fold=2, seed=8) != splits[2]


def test_train_fractions_are_nested_prefixes_and_leave_valid_and_test_alone():
    full = prepare.fold_split(RECORDS, folds=5, fold=0)
    assert len(full["train"]) == 14  # 23 - 4 - 5
    sizes = {}
    for fraction in ("1", "0.5", "0.1", "0.01"):
        split = prepare.fold_split(RECORDS, folds=5, fold=0, train_fraction=fractions.Fraction(fraction))
        assert split["train"] == full["train"][:len(split["train"])]
        assert (split["valid"], split["test"]) == (full["valid"], full["test"])
        sizes[fraction] = len(split["train"])
    assert sizes == {"1": 14, "0.5": 7, "0.1": 2, "0.01": 1}  # ceil(F x 14)


def test_fractions_are_exact():
    # 0.07 x 100 is 7.000000000000001 in floating point, whose ceiling is 8; the fraction 7/100 gives 7
    assert math.ceil(0.07 * 100) == 8
    records = [{"id": i} for i in range(200)]
    split = prepare.fold_split(records, folds=2, fold=0, train_fraction=prepare.train_fraction("0.07"),
                               test=[])
    assert len(split["train"]) == 7


def test_a_given_test_split_stays_in_file_order_and_the_folds_give_valid_and_train():
    test = [{"id": 100 + i} for i in range(5)]
    split = prepare.fold_split(RECORDS, folds=4, fold=1, seed=3, test=test)
    assert split["test"] == test
    alone = prepare.fold_split(RECORDS, folds=4, fold=1, seed=3)
    assert split["valid"] == alone["test"]  # fold 1
    assert sorted(ids(split["train"]) + ids(split["valid"])) == list(range(23))


@pytest.mark.parametrize("kwargs, message", [
    ({"folds": 2}, "--folds 2: need at least 3 folds (test, valid and train)"),
    ({"folds": 1, "test": []}, "--folds 1: need at least 2 folds (valid and train)"),
    ({"folds": 10, "fold": 10}, "--fold 10: must be 0 to 9 for --folds 10"),
    ({"folds": 10, "fold": -1}, "--fold -1: must be 0 to 9 for --folds 10"),
    ({"folds": 24}, "--folds 24: 23 records cannot fill 24 folds"),
    ({"train_fraction": fractions.Fraction(3, 2)}, "--train_fraction 3/2: must be more than 0 and at most 1"),
])
def test_split_option_errors(kwargs, message):
    assert error(lambda: prepare.fold_split(RECORDS, **kwargs)) == message


# ---- the command lines ------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=REPO)


def read_split(folder, split):
    with open(os.path.join(folder, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_sentiment_cli_drops_the_duplicate_and_writes_three_files(tmp_path):
    out = tmp_path / "sentiment"
    result = run_cli("sentiment", "--input", fixture("phrasebank_allagree.txt"), "--output", str(out))
    assert result.returncode == 0, result.stderr
    # 48 lines, one repeated: 47 records in 10 folds of 4 or 5 (fold 0: 4, fold 1: 5)
    assert result.stdout.splitlines() == [
        "dropped 1 duplicate record", "train: 38 records", "valid: 5 records", "test: 4 records",
        f"wrote {out}/train.jsonl, {out}/valid.jsonl, {out}/test.jsonl"]
    splits = {split: read_split(out, split) for split in ("train", "valid", "test")}
    everything = splits["train"] + splits["valid"] + splits["test"]
    assert len({json.dumps(r, sort_keys=True) for r in everything}) == 47
    assert all(list(r) == ["taskname", "sentence", "label"] for r in everything)
    assert sorted(r["sentence"] for r in everything) == sorted(
        {r["sentence"] for r in prepare.read_phrasebank(fixture("phrasebank_allagree.txt"))})
    # the same command again gives the same files; a fraction keeps a prefix of the training split
    again = run_cli("sentiment", "--input", fixture("phrasebank_allagree_latin1.txt"),
                    "--output", str(tmp_path / "b"), "--train_fraction", "0.2")
    assert again.returncode == 0, again.stderr
    assert read_split(tmp_path / "b", "train") == splits["train"][:8]  # ceil(0.2 x 38)
    assert read_split(tmp_path / "b", "test") == splits["test"]


def test_assistant_cli_with_a_test_csv(tmp_path):
    out = tmp_path / "assistant"
    result = run_cli("assistant", "--train", fixture("assistant_train.csv"),
                     "--test", fixture("assistant_test.csv"),
                     "--output", str(out), "--folds", "10", "--fold", "0", "--seed", "1234")
    assert result.returncode == 0, result.stderr
    # 34 rows in 10 folds: fold 0 (3 rows) is valid, the other 31 train; the 10 test rows as they are
    assert result.stdout.splitlines()[:3] == ["train: 31 records", "valid: 3 records", "test: 10 records"]
    test = read_split(out, "test")
    assert test[3] == {"taskname": "intent_and_slot", "utterance": "what alarms are set for today",
                       "label": "Intent: alarm_query\nSlots: date(today)"}
    assert [r["utterance"] for r in test] == [r["utterance"] for r in
                                              prepare.read_assistant_csv(fixture("assistant_test.csv"))[0]]
    without_test = run_cli("assistant", "--train", fixture("assistant_train.csv"),
                           "--output", str(tmp_path / "b"))
    assert without_test.stdout.splitlines()[:3] == ["train: 28 records", "valid: 3 records",
                                                    "test: 3 records"]
    assert read_split(tmp_path / "b", "test") == read_split(out, "valid")  # fold 0 either way


def test_assistant_training_rows_equal_to_test_rows_are_dropped(tmp_path):
    with open(fixture("assistant_train.csv"), encoding="utf-8") as f:
        lines = f.readlines()
    test = write(tmp_path, "test.csv", lines[0] + lines[18] + lines[18])  # the coffee pot row, twice
    result = run_cli("assistant", "--train", fixture("assistant_train.csv"), "--test", test,
                     "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:5] == [
        "dropped 1 duplicate test record", "dropped 1 training record equal to a test record",
        "train: 30 records", "valid: 3 records", "test: 1 records"]
    train_and_valid = read_split(tmp_path / "out", "train") + read_split(tmp_path / "out", "valid")
    assert "please activate my coffee pot for me" not in {r["utterance"] for r in train_and_valid}


@pytest.mark.parametrize("args, message", [
    (["sentiment", "--input", "IN", "--output", "OUT", "--fold", "10"],
     "error: --fold 10: must be 0 to 9 for --folds 10"),
    (["sentiment", "--input", "IN", "--output", "OUT", "--train_fraction", "0"],
     "error: argument --train_fraction: must be more than 0 and at most 1, got 0"),
    (["sentiment", "--input", "IN", "--output", "OUT", "--train_fraction", "half"],
     "error: argument --train_fraction: expected a number, got 'half'"),
    (["assistant", "--train", fixture("assistant_train.csv"), "--output", "OUT", "--folds", "35"],
     "error: --folds 35: 34 records cannot fill 35 folds"),
    (["assistant", "--output", "OUT"], "error: the following arguments are required: --train"),
])
def test_cli_errors_exit_2_with_one_line_and_write_nothing(tmp_path, args, message):
    out = str(tmp_path / "out")
    args = [fixture("phrasebank_allagree.txt") if a == "IN" else out if a == "OUT" else a for a in args]
    result = run_cli(*args)
    assert (result.returncode, result.stderr, result.stdout) == (2, message + "\n", "")
    assert not os.path.exists(out)


# ---- the shipped samples ------------------------------------------------------------------------------

SAMPLES = {"sentiment": {"train": 215, "valid": 56, "test": 56},
           "intent_and_slot": {"train": 296, "valid": 50, "test": 49}}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_samples_have_documented_sizes_and_fit_their_task(tokenizer, name):
    task = load_task_file(os.path.join(REPO, "data", "tasks", "nemo_article.json"))[name]
    folder = os.path.join(REPO, "data", "samples", name)
    seen = set()
    for split, size in SAMPLES[name].items():
        records = template_records(task, os.path.join(folder, f"{split}.jsonl"))
        assert len(records) == size
        for _, record in records:
            assert set(record) == {"taskname", *task.fields}
            build_template_example(task, record, tokenizer)  # never too long
        keys = {json.dumps(r, sort_keys=True) for _, r in records}
        assert not keys & seen  # no record in two splits
        seen |= keys


# ---- any input: a VLMError naming the file, or records ------------------------------------------------

SETTINGS = settings(max_examples=60, deadline=None, database=None)
lines = st.lists(st.one_of(st.text(max_size=20), st.sampled_from([
    HEADER.strip(), '1;alarm;set;"wake [time : six]";"wake six";"x"', '2;a;b;"[x : y";"";""', "a .@neutral",
    "@", "x@positive", '"unclosed', ";;;;;", "\x00"])), max_size=5)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("any_input")


@SETTINGS
@given(content=lines, reader=st.sampled_from(["csv", "txt"]))
def test_readers_on_any_lines(workdir, content, reader):
    path = os.path.join(workdir, f"any.{reader}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(content))
    try:
        records = prepare.read_assistant_csv(path)[0] if reader == "csv" else prepare.read_phrasebank(path)
    except VLMError as caught:
        assert str(caught).startswith(path)
        return
    keys = ["taskname", "utterance", "label"] if reader == "csv" else ["taskname", "sentence", "label"]
    assert all(list(r) == keys and all(isinstance(v, str) and v for v in r.values()) for r in records)
