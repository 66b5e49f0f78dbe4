"""sentence_distiller.py: the teacher's greedy outputs become a new distilled dataset file,
an interrupted run resumes, and train.py --distillation trains on them (validation stays gold)."""
import json
import os

import pytest
import torch
from conftest import run_script

import engines.distill
import sentence_distiller
import train
from engines import loaders, settings
from engines.generate import DecodingOptions, generate_uncached
from models.checkpoint import load_checkpoint, save_checkpoint
from models.vlm import VersatileLM
from tasks.base import decode_text
from tasks.table import TASKS
from utils.data import IGNORE_INDEX

MAX_LENGTH = 6
MT = {"train": [{"src": "a dog runs .", "tgt": "ein hund rennt ."},
                {"src": "two men are talking in the park .", "tgt": "zwei männer reden im park ."},
                {"src": "x", "tgt": "y"},  # under min_tokens: training drops it, the distiller does not
                {"src": "a woman reads .", "tgt": "eine frau liest ."},
                {"src": "children play football on the beach .",
                 "tgt": "kinder spielen fußball am strand ."}],
      "test": [{"src": "a cat sleeps .", "tgt": "eine katze schläft ."},
               {"src": "the sun is shining .", "tgt": "die sonne scheint ."}]}
DIALOGUE = {
    "train": [{"personality": ["i like dogs .", "i am a cook ."], "utterances": [
        {"history": ["hi !"], "candidates": ["bad", "hello , i like dogs ."]},
        {"history": ["hi !", "hello , i like dogs .", "me too !"], "candidates": ["x", "great ."]},
        {"history": ["hi !", "hello , i like dogs .", "me too !", "great .", "what do you cook ?"],
         "candidates": ["pasta ."]}]},
        {"personality": ["i run ."], "utterances": [{"history": ["hello"], "candidates": ["hey there"]}]}],
    "valid": [{"personality": ["i sing ."],
               "utterances": [{"history": ["hey"], "candidates": ["hi , i sing ."]}]}]}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_base, tokenizer):
    """A full checkpoint whose weights differ from the base (as a fine-tuned GPT-2's would)."""
    path = str(tmp_path_factory.mktemp("teacher"))
    model = VersatileLM.from_pretrained(tiny_base)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.gpt2.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    save_checkpoint(model, tokenizer, path, "full", ["mt", "dialogue"], tiny_base)
    return path


def write_dataset(tmp_path, name, content):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(content, indent=1), encoding="utf-8")
    return str(path)


def distill_argv(tmp_path, task, teacher, dataset, *extra, max_history="1"):
    return ["--task", task, "--model_checkpoint", teacher, "--dataset_path", dataset, "--no_sample",
            "--max_length", str(MAX_LENGTH), "--max_history", max_history, "--device", "cpu",
            "--batch_size", "2", "--dataset_cache", str(tmp_path / "cache"), *extra]


def greedy_texts(teacher, task_name, contexts):
    """The teacher's greedy output for each context, decoded one at a time without a cache."""
    model, tokenizer, _ = load_checkpoint(teacher)
    task = TASKS[task_name]
    options = DecodingOptions(max_length=MAX_LENGTH, no_sample=True)
    return [decode_text(tokenizer, generate_uncached(model, task.make_prompt(context, -1), options),
                        cleanup=False)
            for context in contexts]


def read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --- (1) + (2): the targets are the teacher's greedy outputs, in a new file -----------------------
def test_mt_targets_are_the_teachers_greedy_outputs_in_a_new_file(tmp_path, teacher, tokenizer):
    dataset = write_dataset(tmp_path, "mt", MT)
    before = open(dataset, "rb").read()
    result = run_script("sentence_distiller.py", *distill_argv(tmp_path, "mt", teacher, dataset))
    assert result.returncode == 0, result.stderr
    output = str(tmp_path / "mt.distilled.json")  # the default: beside the dataset
    assert output in result.stdout
    assert open(dataset, "rb").read() == before  # the user's file is untouched
    assert not os.path.exists(output + ".partial.jsonl")

    distilled = read(output)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = greedy_texts(teacher, "mt", [encode(r["src"])[:100] for r in MT["train"]])
    assert [r["distillated_tgt"] for r in distilled["train"]] == expected  # every record, "x" included
    assert [{k: v for k, v in r.items() if k != "distillated_tgt"} for r in distilled["train"]] == MT["train"]
    assert distilled["test"] == MT["test"]  # other splits copied unchanged
    assert len(set(expected)) > 1  # the teacher really depends on its input


def test_dialogue_targets_follow_training_contexts_per_utterance(tmp_path, teacher, tokenizer):
    dataset = write_dataset(tmp_path, "persona", DIALOGUE)
    sentence_distiller.main(distill_argv(tmp_path, "dialogue", teacher, dataset, "--output",
                                         str(tmp_path / "out" / "d.json")))
    distilled = read(tmp_path / "out" / "d.json")

    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    contexts = []
    for record in DIALOGUE["train"]:
        persona = [encode(p) for p in record["personality"]]
        for utterance in record["utterances"]:
            # Training's context: the last 2 * max_history + 1 turns, persona rotated per utterance.
            contexts.append((persona, [encode(t) for t in utterance["history"][-3:]]))
            persona = [persona[-1]] + persona[:-1]
    expected = greedy_texts(teacher, "dialogue", contexts)
    got = [u["distillated_candidates"] for r in distilled["train"] for u in r["utterances"]]
    assert got == [[text] for text in expected]
    for original, copy in zip(DIALOGUE["train"], distilled["train"]):
        assert [{k: v for k, v in u.items() if k != "distillated_candidates"} for u in copy["utterances"]] \
            == original["utterances"]
    assert distilled["valid"] == DIALOGUE["valid"]


def test_nlg_decodes_a_repeated_mr_once_and_gives_every_record_its_text(tmp_path, teacher, tokenizer,
                                                                        monkeypatch):
    mr, other = {"name": "The Vaults", "eatType": "pub"}, {"name": "Alimentum", "area": "city centre"}
    nlg = {"train": [{"src": mr, "tgt": "The Vaults is a pub."},
                     {"src": other, "tgt": "Alimentum is central."},
                     {"src": mr, "tgt": "There is a pub called The Vaults."}],
           "valid": [{"src": other, "tgt": "Alimentum is in the centre."}]}
    dataset = write_dataset(tmp_path, "nlg", nlg)
    real_generate, decoded = engines.distill.generate, []

    def counting(model, prompts, *args, **kwargs):
        decoded.extend(p.meta["index"] for p in prompts)
        return real_generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(engines.distill, "generate", counting)
    sentence_distiller.main(distill_argv(tmp_path, "nlg", teacher, dataset))
    assert sorted(decoded) == [0, 1]  # E2E repeats an MR per reference: greedy decodes it once
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    texts = greedy_texts(teacher, "nlg", [[(k, encode(v)) for k, v in m.items()] for m in (mr, other)])
    distilled = read(tmp_path / "nlg.distilled.json")
    assert [r["distillated_tgt"] for r in distilled["train"]] == [texts[0], texts[1], texts[0]]
    assert distilled["valid"] == nlg["valid"]


# --- (3): resume after an interruption --------------------------------------------------------------
def test_an_interrupted_run_resumes_and_decodes_only_the_rest(tmp_path, teacher, monkeypatch):
    dataset = write_dataset(tmp_path, "mt", MT)
    reference = str(tmp_path / "reference.json")
    sentence_distiller.main(distill_argv(tmp_path, "mt", teacher, dataset, "--output", reference))

    real_generate = engines.distill.generate
    decoded = []

    def interrupted(model, prompts, *args, **kwargs):
        if decoded:  # the second batch never finishes
            raise KeyboardInterrupt
        decoded.extend(p.meta["index"] for p in prompts)
        return real_generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(engines.distill, "generate", interrupted)
    output = str(tmp_path / "mt.distilled.json")
    with pytest.raises(KeyboardInterrupt):
        sentence_distiller.main(distill_argv(tmp_path, "mt", teacher, dataset))
    assert not os.path.exists(output)
    partial = output + ".partial.jsonl"
    lines = open(partial, encoding="utf-8").read().splitlines()
    assert "settings" in json.loads(lines[0])
    assert sorted(json.loads(line)["index"] for line in lines[1:]) == sorted(decoded) and len(decoded) == 2
    with open(partial, "a", encoding="utf-8") as f:
        f.write('{"index": 4, "te')  # a line torn by the interruption is ignored

    first = list(decoded)
    decoded.clear()

    def counting(model, prompts, *args, **kwargs):
        decoded.extend(p.meta["index"] for p in prompts)
        return real_generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(engines.distill, "generate", counting)
    sentence_distiller.main(distill_argv(tmp_path, "mt", teacher, dataset))
    assert sorted(decoded) == sorted(set(range(len(MT["train"]))) - set(first))  # only the rest
    assert open(output, "rb").read() == open(reference, "rb").read()
    assert not os.path.exists(partial)


def test_progress_of_other_settings_is_not_resumed(tmp_path, teacher, capsys):
    dataset = write_dataset(tmp_path, "mt", MT)
    output = str(tmp_path / "mt.distilled.json")
    settings_line = json.dumps({"settings": {"task": "mt", "other": True}})
    with open(output + ".partial.jsonl", "w", encoding="utf-8") as f:
        f.write(settings_line + "\n" + json.dumps({"index": 0, "text": "stale"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        sentence_distiller.main(distill_argv(tmp_path, "mt", teacher, dataset))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {output}.partial.jsonl: progress of a run with other settings")
    assert not os.path.exists(output)


# --- (4): train.py --distillation trains on the distilled targets, validates on gold ---------------
def test_train_distillation_finds_the_distilled_file_and_keeps_validation_gold(tmp_path, teacher, tokenizer,
                                                                               tiny_base, capsys):
    dataset = write_dataset(tmp_path, "mt", MT)
    sentence_distiller.main(distill_argv(tmp_path, "mt", teacher, dataset))
    distilled_file = str(tmp_path / "mt.distilled.json")
    distilled = read(distilled_file)
    capsys.readouterr()

    args = train.parse_args(["--task", "mt", "--dataset_path", dataset,
                             "--dataset_cache", str(tmp_path / "cache"), "--distillation",
                             "--model_checkpoint", tiny_base, "--output_dir", str(tmp_path / "run")])
    task, _ = settings.prepare_args(args)
    data = loaders.load_splits(args, task, tokenizer)
    assert capsys.readouterr().out.strip() == \
        f"--distillation: training on the distilled targets of {distilled_file}"
    assert args.dataset_path == distilled_file
    train_examples, valid_examples = loaders.split_examples(args, task, data, 512)

    def targets(examples):
        return [tokenizer.decode([t for t in e["labels"] if t != IGNORE_INDEX][:-1]) for e in examples]

    def kept(src, tgt):  # training's min_tokens rule, applied to the distilled targets
        return len(tokenizer.encode(src)) >= task.min_tokens and len(tokenizer.encode(tgt)) >= task.min_tokens

    expected = [r["distillated_tgt"] for r in distilled["train"] if kept(r["src"], r["distillated_tgt"])]
    assert expected and targets(train_examples) == expected
    assert targets(valid_examples) == [r["tgt"] for r in MT["test"]]  # mt validates on its test split: gold


def test_train_distillation_prefers_a_dataset_that_has_the_targets(tmp_path, tokenizer, tiny_base, capsys):
    records = [dict(r, distillated_tgt="distilled " + r["tgt"]) for r in MT["train"]]
    dataset = write_dataset(tmp_path, "own", {"train": records, "test": MT["test"]})
    write_dataset(tmp_path, "own.distilled", {"train": MT["train"], "test": MT["test"]})  # not used
    args = train.parse_args(["--task", "mt", "--dataset_path", dataset, "--dataset_cache", "",
                             "--distillation", "--model_checkpoint", tiny_base,
                             "--output_dir", str(tmp_path / "run")])
    task, _ = settings.prepare_args(args)
    loaders.load_splits(args, task, tokenizer)
    assert args.dataset_path == dataset
    assert capsys.readouterr().out.strip() == ("--distillation: training on the distilled targets of "
                                               f"{dataset}")


# --- (5): bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case, expected", [
    ("same_output", "--output {dataset}: is the dataset file itself"),
    ("unknown_task", "--task: unknown task 'poetry'"),
    ("missing_teacher", "--model_checkpoint {tmp}/nowhere: teacher checkpoint folder not found"),
    ("missing_dataset", "--dataset_path {tmp}/missing.json: dataset file not found"),
    ("bad_flag", "unrecognized arguments: --bogus"),
])
def test_bad_input_gives_one_error_line(tmp_path, teacher, capsys, case, expected):
    dataset = write_dataset(tmp_path, "mt", MT)
    before = open(dataset, "rb").read()
    argv = distill_argv(tmp_path, "mt", teacher, dataset)
    argv += {"same_output": ["--output", dataset], "unknown_task": ["--task", "poetry"],
             "missing_teacher": ["--model_checkpoint", str(tmp_path / "nowhere")],
             "missing_dataset": ["--dataset_path", str(tmp_path / "missing.json")],
             "bad_flag": ["--bogus"]}[case]
    with pytest.raises(SystemExit) as exit_info:
        sentence_distiller.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected.format(dataset=dataset, tmp=tmp_path) in lines[0]
    assert open(dataset, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["mt.json"]  # nothing written
