"""data/prepare.py: each raw format on real slices (tests/fixtures/prepare), errors, the CLI, the samples."""
import gzip
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "prepare")
SCRIPT = os.path.join(REPO, "data", "prepare.py")

# data/ is a folder of scripts, not a package: load the script as a module.
_spec = importlib.util.spec_from_file_location("prepare", SCRIPT)
prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare)
from utils.errors import VLMError  # noqa: E402  (importable once prepare put the repo on sys.path)


def fixture(name):
    return os.path.join(FIXTURES, name)


def convert(task, **split_paths):
    return prepare.prepare(task, {split: [fixture(p) for p in paths] for split, paths in split_paths.items()})


def write(tmp_path, name, content):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return str(path)


# ---- mt ---------------------------------------------------------------------------------------


def test_multi30k_gzip_pair():
    data = convert("mt", train=["multi30k_train.en.gz", "multi30k_train.de.gz"])
    assert list(data) == ["train"]
    assert len(data["train"]) == 5
    assert data["train"][0] == {
        "src": "Two young, White males are outside near many bushes.",
        "tgt": "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
    }


def test_iwslt_xml_pair_aligned_stripped_unescaped():
    pair = ["iwslt16_tst2010.en-de.en.xml", "iwslt16_tst2010.en-de.de.xml"]
    records = convert("mt", test=pair)["test"]
    assert len(records) == 4
    assert records[0]["src"].startswith("One day, Los Angeles Times")
    assert records[0]["tgt"].startswith("Als Steve Lopez")
    assert records[3]["src"].startswith("BG: Well, the actual spending on the R&D piece")
    assert records[3]["tgt"].startswith("BG: Nun, die tatsächlichen Ausgaben")
    assert all(r["src"] == r["src"].strip() and r["tgt"] == r["tgt"].strip() for r in records)


def test_several_pairs_in_one_split_are_concatenated():
    data = convert("mt", test=["iwslt16_tst2010.en-de.en.xml", "iwslt16_tst2010.en-de.de.xml",
                               "multi30k_train.en.gz", "multi30k_train.de.gz"])
    assert len(data["test"]) == 4 + 5


def test_parallel_line_counts_must_match(tmp_path):
    src = write(tmp_path, "a.en", "one\ntwo\nthree\n")
    tgt = write(tmp_path, "a.de", "eins\nzwei\n")
    with pytest.raises(VLMError, match=r"a\.en has 3 lines but .*a\.de has 2"):
        prepare.prepare("mt", {"train": [src, tgt]})


def test_parallel_corpus_needs_its_partner_file():
    with pytest.raises(VLMError, match="has no partner"):
        convert("mt", train=["multi30k_train.en.gz"])


def test_iwslt_missing_segment_names_file_and_line(tmp_path):
    with open(fixture("iwslt16_tst2010.en-de.de.xml"), encoding="utf-8") as f:
        german = f.read().replace('<seg id="2">', '<seg id="9">')
    tgt = write(tmp_path, "t.de.xml", german)
    with pytest.raises(VLMError, match=r"en\.xml, line 6: doc 805 seg 2 has no counterpart in .*t\.de\.xml"):
        prepare.prepare("mt", {"test": [fixture("iwslt16_tst2010.en-de.en.xml"), tgt]})


# ---- nlg --------------------------------------------------------------------------------------


def test_e2e_slots_parsed_in_mr_order():
    data = convert("nlg", train=["e2e_train.csv"], valid=["e2e_dev.csv"])
    first = data["train"][0]
    assert list(first["src"].items()) == [
        ("name", "The Vaults"), ("eatType", "pub"), ("priceRange", "more than £30"),
        ("customer rating", "5 out of 5"), ("near", "Café Adriatic")]
    assert first["tgt"] == "The Vaults pub near Café Adriatic has a 5 star rating.  Prices start at £30."
    # a quoted reference spanning two lines is one record
    assert len(data["train"]) == 5
    assert data["train"][4]["tgt"].endswith("located near The Bakers.\n  "
                                            "This coffee shop is a high customer rating")
    assert len(data["valid"]) == 12
    assert all(set(r["src"]) <= set(prepare.E2E_SLOTS) for r in data["train"] + data["valid"])


def test_nlg_slice_counts_mrs_with_all_their_references():
    data = prepare.prepare("nlg", {"valid": [fixture("e2e_dev.csv")], "test": [fixture("e2e_dev.csv")]},
                           {"valid": (0, 1), "test": (1, 2)})
    assert len(data["valid"]) == 6 and len(data["test"]) == 6
    assert all(r["src"] == {"name": "Alimentum", "area": "city centre", "familyFriendly": "no"}
               for r in data["valid"])
    assert all(r["src"]["near"] == "Burger King" for r in data["test"])
    assert prepare.describe("nlg", data["valid"]) == "6 references of 1 MRs"


def test_unknown_slot_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.csv", 'mr,ref\n"name[A], area[x]",ok\n"name[B], colour[red]",bad\n')
    with pytest.raises(VLMError, match=r"bad\.csv, line 3: unknown slot 'colour'"):
        prepare.prepare("nlg", {"train": [path]})


def test_unparsable_mr_and_missing_column(tmp_path):
    broken = write(tmp_path, "broken.csv", "mr,ref\nname[A] area[x],text\n")
    with pytest.raises(VLMError, match=r"broken\.csv, line 2: cannot parse the MR"):
        prepare.prepare("nlg", {"train": [broken]})
    no_ref = write(tmp_path, "noref.csv", "MR\nname[A]\n")
    with pytest.raises(VLMError, match=r"noref\.csv, line 1: expected a header with columns mr and ref"):
        prepare.prepare("nlg", {"test": [no_ref]})


# ---- dialogue ---------------------------------------------------------------------------------


def test_parlai_text_dialogues_history_and_gold():
    dialogues = convert("dialogue", train=["convai2_valid.txt"])["train"]
    assert len(dialogues) == 2
    first = dialogues[0]
    assert first["personality"] == ["i read twenty books a year.", "i'm a stunt double as my second job.",
                                    "i only eat kosher.", "i was raised in a single parent household."]
    assert len(first["utterances"]) == 8
    assert first["utterances"][0] == {"history": ["hello what are doing today ?"],
                                      "candidates": ["i am good , i just got off work and tired , "
                                                     "i have two jobs ."]}
    second = first["utterances"][1]
    assert second["history"] == ["hello what are doing today ?",
                                 "i am good , i just got off work and tired , i have two jobs .",
                                 "i just got done watching a horror movie"]
    # history k: 2k previous turns plus the partner's current message
    assert [len(u["history"]) for u in first["utterances"]] == [1, 3, 5, 7, 9, 11, 13, 15]
    assert dialogues[1]["utterances"][0]["history"] == ["hi ! how are you doing tonight ?"]


def test_parlai_candidates_put_gold_last_once():
    (dialogue,) = convert("dialogue", valid=["convai2_with_cands.txt"])["valid"]
    turns = dialogue["utterances"]
    assert [len(u["candidates"]) for u in turns] == [3, 3, 3]
    assert turns[1]["candidates"][-1] == "i rather read , i've read about 20 books this year ."
    assert turns[1]["candidates"].count(turns[1]["candidates"][-1]) == 1


def test_parlai_bad_numbering_names_line(tmp_path):
    path = write(tmp_path, "d.txt", "1 your persona: i like tea.\n2 hi\thello\n4 how are you\tfine\n")
    with pytest.raises(VLMError, match=r"d\.txt, line 3: line number 4 where 3 was expected"):
        prepare.prepare("dialogue", {"train": [path]})
    path = write(tmp_path, "e.txt", "1 your persona: i like tea.\n2 hi there\n")
    with pytest.raises(VLMError, match=r"e\.txt, line 2: expected `partner message<TAB>reply`"):
        prepare.prepare("dialogue", {"train": [path]})


def test_personachat_json_copies_the_flagged_split():
    path = fixture("personachat_self_original.json")
    data = prepare.prepare("dialogue", {"train": [path], "valid": [path]})
    with open(path, encoding="utf-8") as f:
        original = json.load(f)
    assert data == {"train": original["train"], "valid": original["valid"]}
    with pytest.raises(VLMError, match=r"no 'test' split .*has: train, valid"):
        prepare.prepare("dialogue", {"test": [path]})


def test_personachat_json_missing_key_names_record(tmp_path):
    path = write(tmp_path, "p.json",
                 json.dumps({"train": [{"personality": ["x"], "utterances": [{"history": ["hi"]}]}]}))
    with pytest.raises(VLMError, match=r"p\.json, train record 0, utterance 0: missing key 'candidates'"):
        prepare.prepare("dialogue", {"train": [path]})


# ---- qa ---------------------------------------------------------------------------------------


def test_coqa_history_candidates_turn_ids():
    data = convert("qa", train=["coqa_train_first_story.json"], valid=["coqa_dev.json"])
    assert [len(data["train"]), len(data["valid"])] == [1, 2]
    story = data["valid"][0]
    assert story["id"] == "3dr23u6we5exclen4th8uq9rb42tel"
    assert story["document"][0].startswith("Once upon a time, in a barn near a farm house")
    assert story["utterances"][0] == {"history": ["What color was Cotton?"], "candidates": ["white"],
                                      "turn_id": 1}
    assert story["utterances"][2]["history"] == ["What color was Cotton?", "white", "Where did she live?",
                                                 "in a barn", "Did she live alone?"]
    assert [u["turn_id"] for u in story["utterances"]] == list(range(1, len(story["utterances"]) + 1))
    # the complete official format (spans, names) converts the same way
    train = data["train"][0]["utterances"][0]
    assert train == {"history": ["When was the Vat formally opened?"],
                     "candidates": ["It was formally established in 1475"], "turn_id": 1}


def test_coqa_mismatched_answers_and_missing_keys(tmp_path):
    story = {"id": "s1", "story": "text", "questions": [{"input_text": "q?", "turn_id": 1}],
             "answers": [{"input_text": "a", "turn_id": 2}]}
    path = write(tmp_path, "c.json", json.dumps({"data": [story]}))
    with pytest.raises(VLMError, match=r"c\.json, story 0 \(id s1\), turn 1: answer has turn_id 2"):
        prepare.prepare("qa", {"train": [path]})
    path = write(tmp_path, "d.json", json.dumps({"version": "1.0"}))
    with pytest.raises(VLMError, match=r"d\.json, top level: missing key 'data'"):
        prepare.prepare("qa", {"valid": [path]})


def test_bad_json_names_line(tmp_path):
    path = write(tmp_path, "bad.json", '{"data": [\n  {"id": "x",\n  }\n]}\n')
    with pytest.raises(VLMError, match=r"bad\.json, line 3: bad JSON"):
        prepare.prepare("qa", {"train": [path]})


# ---- summarization ----------------------------------------------------------------------------


def test_cnndm_jsonl():
    records = convert("summarization", test=["cnndm_test.jsonl"])["test"]
    assert len(records) == 2
    assert records[0]["src"].startswith("Gary Locke will be confirmed as Kilmarnock\u2019s permanent manager")
    assert records[0]["tgt"] == ("Gary Locke will be confirmed as Kilmarnock boss on Friday . "
                                 "The club went unbeaten during Locke 's first six games in charge . "
                                 "The 39-year-old former Killie defender has paid tribute to his players .")


def test_story_folder_joins_highlights_like_see_et_al():
    (record,) = convert("summarization", train=["cnndm_stories"])["train"]
    jsonl = convert("summarization", test=["cnndm_test.jsonl"])["test"][0]
    # highlights without final periods get " ." and are joined by spaces: the JSONL's target
    assert record["tgt"] == jsonl["tgt"]
    assert record["src"].startswith("Gary Locke will be confirmed")
    assert "\n" not in record["src"] and "three-year deal. And on Thursday" in record["src"]


def test_summarization_errors_name_file_and_line(tmp_path):
    path = write(tmp_path, "s.jsonl", '{"article": "a", "highlights": "h"}\n{"article": "b"}\n')
    with pytest.raises(VLMError, match=r"s\.jsonl, line 2: missing key 'highlights'"):
        prepare.prepare("summarization", {"train": [path]})
    story = write(tmp_path, "x.story", "Only an article.\n")
    with pytest.raises(VLMError, match=r"x\.story: no @highlight lines"):
        prepare.prepare("summarization", {"train": [story]})


# ---- shared checks ----------------------------------------------------------------------------


def test_non_utf8_names_file_and_line(tmp_path):
    src = write(tmp_path, "l.en.gz", gzip.compress(b"fine\nna\xefve caf\xe9\n"))
    tgt = write(tmp_path, "l.de.gz", gzip.compress("gut\nnaiv\n".encode()))
    with pytest.raises(VLMError, match=r"l\.en\.gz, line 2: not valid UTF-8"):
        prepare.prepare("mt", {"train": [src, tgt]})


def test_empty_split_and_unrecognised_format(tmp_path):
    empty = write(tmp_path, "empty.csv", "mr,ref\n")
    with pytest.raises(VLMError, match=r"--train .*empty\.csv: no records"):
        prepare.prepare("nlg", {"train": [empty]})
    with pytest.raises(VLMError, match=r"e2e_dev\.csv: not a recognised qa file"):
        convert("qa", train=["e2e_dev.csv"])
    with pytest.raises(VLMError, match="no records in the requested slice"):
        prepare.prepare("dialogue", {"valid": [fixture("convai2_valid.txt")]}, {"valid": (5, 9)})


# ---- command line -----------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=REPO)


def test_cli_prints_counts_and_writes_json(tmp_path):
    out = tmp_path / "dialogue.json"
    result = run_cli("dialogue", "--train", fixture("convai2_valid.txt"), "--slice", "train", "0:1",
                     "--valid", fixture("convai2_with_cands.txt"), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "train: 1 dialogues, 8 turns" in result.stdout
    assert "valid: 1 dialogues, 3 turns" in result.stdout
    with open(out, encoding="utf-8") as f:
        data = json.load(f)
    assert list(data) == ["train", "valid"]
    assert data["train"][0]["personality"][0] == "i read twenty books a year."


def test_cli_user_error_exits_2_with_message(tmp_path):
    result = run_cli("mt", "--train", fixture("multi30k_train.en.gz"), "--output", str(tmp_path / "o.json"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: --train: parallel plain text pair")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.json").exists()


# ---- the shipped samples ----------------------------------------------------------------------

SAMPLE_SIZES = {
    "mt": {"train": 300, "valid": 60, "test": 60},
    "nlg": {"train": 300, "valid": 210, "test": 148},
    "dialogue": {"train": 20, "valid": 5},
    "qa": {"train": 10, "valid": 3},
    "summarization": {"train": 40, "valid": 10, "test": 10},
}
RECORD_KEYS = {"mt": {"src", "tgt"}, "nlg": {"src", "tgt"}, "summarization": {"src", "tgt"},
               "dialogue": {"personality", "utterances"}, "qa": {"id", "document", "utterances"}}


@pytest.mark.parametrize("task", sorted(SAMPLE_SIZES))
def test_samples_have_documented_sizes_and_layout(task):
    with open(os.path.join(REPO, "data", "samples", f"{task}.json"), encoding="utf-8") as f:
        data = json.load(f)
    assert {split: len(records) for split, records in data.items()} == SAMPLE_SIZES[task]
    assert all(set(record) == RECORD_KEYS[task] for records in data.values() for record in records)
    if task == "nlg":  # grouping by MR: no MR is split across valid and test
        valid = {json.dumps(r["src"], sort_keys=True) for r in data["valid"]}
        assert not valid & {json.dumps(r["src"], sort_keys=True) for r in data["test"]}
