"""score.py, and the official E2E figures that it and evaluate.py report (METEOR 1.5 through Java,
METEOR* without it): the same metric code for files as for decoded outputs, bad input in one line."""
import json
import os
import shutil
import stat
import time

import pytest
from conftest import run_script

import score
from engines.evaluation import score_and_write
from engines.scoring import scoring_task
from tasks.base import Prompt
from tasks.table import TASKS
from utils import e2e_java, metrics
from utils.data import text_lines
from utils.errors import VLMError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "e2e_scoring")
E2E_NAMES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")

# The official E2E scorer's figures for fixtures/e2e_scoring (README there), as printed by
#   ./measure_scores.py tests/fixtures/e2e_scoring/refs.txt tests/fixtures/e2e_scoring/hyps.txt
# run in a checkout of github.com/tuetschek/e2e-metrics at 1b9c4d87fd0bbb171ea966741cdc012588581ed4
# (its three jars taken from the pycocoevalcap 1.2 wheel: the same git blobs as the repository's), with
# Python 3.11 and its requirements.txt (future, matplotlib, scikit-image), perl 5.36 with XML::Twig and
# OpenJDK 17. BLEU and NIST come from its default mteval-v13a-sig.pl; its `-p` (pymteval) would give
# BLEU 0.5927, NIST 6.7152. It prints four decimals, hence abs=1e-4.
OFFICIAL = {"BLEU": 0.5878, "NIST": 7.5972, "METEOR": 0.4017, "ROUGE_L": 0.6681, "CIDEr": 1.4595}
# Ours without Java (utils/metrics.py's approximation), on the same files
APPROXIMATE_METEOR = 0.6665450099750221


def fixture_text(name):
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        return f.read()


def e2e_fixture():
    """(MRs, hypotheses, reference blocks) of fixtures/e2e_scoring."""
    blocks = [block.split("\n") for block in fixture_text("refs.txt").rstrip("\n").split("\n\n")]
    return text_lines(fixture_text("mrs.txt")), text_lines(fixture_text("hyps.txt")), blocks


def last_json_line(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def fake_java(folder, script):
    """A `java` on PATH that runs `script` (sh) instead of Java."""
    path = folder / "java"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(folder)


@pytest.fixture(scope="module")
def nlg_scored(tmp_path_factory):
    """evaluate.py's scoring of the fixture's outputs (score_and_write, with its files), and
    score.py run as a user runs it on the files that wrote."""
    mrs, hypotheses, blocks = e2e_fixture()
    out = tmp_path_factory.mktemp("nlg")
    prompts = [Prompt([], [], meta={"mr": mr, "references": refs}) for mr, refs in zip(mrs, blocks)]
    result = score_and_write(TASKS["nlg"], prompts, hypotheses, str(out))
    cli = run_script("score.py", "--task", "nlg", "--hypotheses", str(out / "nlg_output.txt"),
                     "--references", str(out / "nlg_ref.txt"), "--output", str(out / "scored.json"))
    return out, result, cli


def test_evaluate_gives_the_official_e2e_figures(nlg_scored):
    out, result, _ = nlg_scored
    assert {name: result[name] for name in E2E_NAMES} == pytest.approx(OFFICIAL, abs=1e-4)
    assert set(result) == {"task", "examples", *E2E_NAMES} and result["examples"] == 40
    # evaluate.py writes the official scorer's files: the fixture's own bytes
    assert (out / "nlg_ref.txt").read_text(encoding="utf-8") == fixture_text("refs.txt")
    assert (out / "nlg_output.txt").read_text(encoding="utf-8") == fixture_text("hyps.txt")


def test_score_py_gives_evaluates_figures_for_its_files(nlg_scored):
    out, result, cli = nlg_scored
    assert cli.returncode == 0, cli.stderr
    assert last_json_line(cli.stdout) == result
    assert json.loads((out / "scored.json").read_text()) == result
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_without_java_meteor_is_the_approximation_named_meteor_star(tmp_path, monkeypatch, caplog):
    _, hypotheses, blocks = e2e_fixture()
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without java
    scores = metrics.e2e_scores(hypotheses, blocks)
    assert list(scores) == ["BLEU", "NIST", "METEOR*", "ROUGE_L", "CIDEr"]
    assert scores["METEOR*"] == pytest.approx(APPROXIMATE_METEOR, rel=1e-12)
    # the rest is the official figures: BLEU and NIST need no Java, and the emulated PTB tokenizer
    # agrees with Stanford's on these texts
    assert {name: scores[name] for name in ("BLEU", "NIST", "ROUGE_L", "CIDEr")} == pytest.approx(
        {name: OFFICIAL[name] for name in ("BLEU", "NIST", "ROUGE_L", "CIDEr")}, abs=1e-4)
    assert caplog.records == []  # no Java is no surprise: the name says it


def test_score_py_without_java_prints_meteor_star(tmp_path):
    done = run_script("score.py", "--task", "nlg", "--hypotheses", os.path.join(FIXTURES, "hyps.txt"),
                      "--references", os.path.join(FIXTURES, "refs.txt"), env={"PATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    printed = last_json_line(done.stdout)
    assert "METEOR" not in printed and printed["METEOR*"] == pytest.approx(APPROXIMATE_METEOR, rel=1e-12)


def test_a_failing_java_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", fake_java(tmp_path, "echo 'Error: no JVM' >&2; exit 1"))
    scores = metrics.e2e_scores(["The pub is cheap."], [["The pub is cheap.", "A cheap pub."]])
    assert "METEOR*" in scores and "METEOR" not in scores
    assert [r.getMessage() for r in caplog.records] == [
        "E2E metrics: the official Java tools could not run (the PTB tokenizer failed (exit 1): "
        "Error: no JVM); METEOR* is an approximation"]


def test_a_meteor_run_is_bounded_and_ended(tmp_path, monkeypatch):
    # a Java that never answers
    monkeypatch.setenv("PATH", fake_java(tmp_path, f"exec {shutil.which('sleep')} 60"))
    started = time.monotonic()
    with pytest.raises(e2e_java.JavaUnavailable, match="METEOR took longer than 1 s"):
        e2e_java.meteor(["a cheap pub"], [["the pub is cheap"]], timeout=1)
    assert time.monotonic() - started < 10


def test_ptb_captions_are_pycocoevalcaps():
    # lower-cased; brackets kept as -lrb- (pycocoevalcap's list has "-LRB-"); "£" is PTB's "#";
    # punctuation dropped; an empty text stays one caption, and so does a text with line breaks
    assert e2e_java.ptb_captions(["Aromi (coffee shop), £20-25.", "", "two\nlines\u2028here", "It's"]) == [
        "aromi -lrb- coffee shop -rrb- # 20-25", "", "two lines here", "it 's"]


def test_score_py_gives_evaluates_figures_for_mt(tmp_path, capsys):
    outputs = ["ein hund rennt .", "zwei männer  reden über  alles", "", "eine frau"]
    references = ["ein hund rennt .", "zwei männer reden .", "ein kind spielt .", "eine frau liest ."]
    prompts = [Prompt([], [], meta={"reference": ref}) for ref in references]
    result = score_and_write(TASKS["mt"], prompts, outputs, str(tmp_path))
    assert set(result) == {"task", "examples", "bleu", "sacrebleu", "rouge1", "rouge2", "rougeL",
                           "rouge_mean"}
    score.main(["--task", "mt", "--hypotheses", str(tmp_path / "mt_output.txt"),
                "--references", str(tmp_path / "mt_ref.txt")])
    assert last_json_line(capsys.readouterr().out) == result


def test_score_py_reads_coqa_gold_as_json_lines(tmp_path, capsys):
    (tmp_path / "answers.txt").write_text("cat\nthe red mat\n", encoding="utf-8")
    (tmp_path / "gold.jsonl").write_text('{"id": "s1", "turn_id": 1, "answer": "the cat"}\n'
                                         '{"id": "s1", "turn_id": 2, "answer": "on the mat"}\n',
                                         encoding="utf-8")
    score.main(["--task", "qa", "--hypotheses", str(tmp_path / "answers.txt"),
                "--references", str(tmp_path / "gold.jsonl")])
    # turn 1 exact after normalisation; turn 2 "red mat" vs "on mat": P = R = 1/2
    assert last_json_line(capsys.readouterr().out) == {"task": "qa", "examples": 2, "f1": 75.0, "em": 50.0,
                                                       "turns": 2}


def test_score_py_reads_task_file_answers_escaped_as_evaluate_writes_them(tmp_path, capsys):
    task_file = tmp_path / "tasks.json"
    task_file.write_text(json.dumps({"task_templates": [{
        "taskname": "intents", "prompt_template": "<|VIRTUAL_PROMPT_0|> {utterance} {answer}",
        "total_virtual_tokens": 2, "virtual_token_splits": [2], "answer_field": "answer",
        "metric": "intent_slot"}]}))
    (tmp_path / "out.txt").write_text("Intent: alarm_set\\nSlots: time(seven)\nIntent: x\\nSlots: None\n")
    (tmp_path / "ref.txt").write_text("Intent: alarm_set\\nSlots: time(seven)\n"
                                      "Intent: alarm_query\\nSlots: date(today), time(seven \\\\ eight)\n")
    score.main(["--task_file", str(task_file), "--task", "intents", "--hypotheses", str(tmp_path / "out.txt"),
                "--references", str(tmp_path / "ref.txt"), "--output", str(tmp_path / "m.json")])
    # 1 of 2 intents; 1 predicted pair, right, of 3 gold pairs
    expected = {"task": "intents", "examples": 2, "intent_accuracy": 0.5, "slot_precision": 1.0,
                "slot_recall": pytest.approx(1 / 3), "slot_f1": pytest.approx(0.5)}
    assert last_json_line(capsys.readouterr().out) == expected
    assert json.loads((tmp_path / "m.json").read_text()) == expected
    assert scoring_task("intents", str(task_file)).read_references(str(tmp_path / "ref.txt"))[1] == (
        "Intent: alarm_query\nSlots: date(today), time(seven \\ eight)")


def test_nlg_references_read_as_the_e2e_scorer_reads_them(tmp_path):
    nlg = TASKS["nlg"]
    path = tmp_path / "refs.txt"
    path.write_text(" a one \na two\n\nb one\n\n\n", encoding="utf-8")  # blank lines at the end are ignored
    assert nlg.read_references(str(path)) == [["a one", "a two"], ["b one"]]
    path.write_text("a\nb\n", encoding="utf-8")  # no blank line: one reference per MR
    assert nlg.read_references(str(path)) == [["a"], ["b"]]
    path.write_text("a\n\n\nb\n", encoding="utf-8")
    with pytest.raises(VLMError, match=r"refs.txt, line 3: an empty reference block"):
        nlg.read_references(str(path))


def test_text_lines_split_at_newlines_only():
    assert text_lines("a\r\nb\u2028c\rd\n\n") == ["a", "b\u2028c\rd", ""]
    assert text_lines("") == []


@pytest.mark.parametrize("files, extra, message", [
    (("a\nb\nc\n", "a\nb\n"), [], "3 hypotheses in {hyp} but 2 references in {ref}; they must pair up"),
    ((None, "a\n"), [], "--hypotheses {hyp}: file not found"),
    (("a\n", None), [], "--references {ref}: file not found"),
    (("a\n", "a\n"), ["--task", "nope"], "--task: unknown task 'nope'; choose one of"),
    (("a\n", '{"id": "s1", "answer": "x"}\n'), ["--task", "qa"], "{ref}, line 1: expected "),
    (("a\n", "a\n"), ["--output", "{dir}"], "--output {dir}: is a folder"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, files, extra, message):
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    for path, content in zip((hyp, ref), files):
        if content is not None:
            path.write_text(content, encoding="utf-8")
    names = {"hyp": hyp, "ref": ref, "dir": tmp_path}
    argv = ["--task", "mt", "--hypotheses", str(hyp), "--references", str(ref)]
    with pytest.raises(SystemExit) as exit_info:
        score.main(argv + [part.format(**names) for part in extra])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: " + message.format(**names))
    assert captured.err.count("\n") == 1


def test_score_py_bad_input_exits_2_without_traceback(tmp_path):
    (tmp_path / "hyp.txt").write_text("a\n")
    done = run_script("score.py", "--task", "mt", "--hypotheses", str(tmp_path / "hyp.txt"),
                      "--references", str(tmp_path / "missing.txt"))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"error: --references {tmp_path / 'missing.txt'}: file not found\n"
