"""Bad input, swept: property tests (hypothesis) over the loaders, the input builder, the MR and
user-input parsers and data/prepare.py's converters -- any input ends in a VLMError or a valid
result, never another exception -- and a table of bad files and flags through train.py and
evaluate.py, each ending in exit code 2 and one `error:` line (or, where stated, a counted warning)."""
import importlib.util
import io
import json
import logging
import os
import sys

import pytest
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

import evaluate
import train
from engines.generate import DecodingOptions, generate, generate_uncached
from engines.specs import adapter_specs
from models.checkpoint import load_checkpoint, save_checkpoint
from models.vlm import VersatileLM
from tasks.table import TASKS
from utils.data import IGNORE_INDEX
from utils.errors import VLMError
from utils.vocab import special_token_id

_spec = importlib.util.spec_from_file_location("prepare", os.path.join(REPO, "data", "prepare.py"))
prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare)

SETTINGS = settings(max_examples=60, deadline=None, database=None)  # database=None: no example files written
SLOTS = list(TASKS["nlg"].slot_tokens)
KEYS = ["train", "valid", "val", "test", "src", "tgt", "document", "personality", "utterances", "history",
        "candidates", "id", "turn_id"] + SLOTS

# --- strategies ----------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False),
                    st.text(max_size=8),
                    st.sampled_from(["", " ", "a b c d", "The Vaults", "\u00e9t\u00e9 \U0001f600",
                                     "lone \ud800 surrogate"]))
# Arbitrary JSON, shaped like the datasets often enough to get past the first checks.
json_values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=4)), children, max_size=4)),
    max_leaves=12)
token_lists = st.lists(st.integers(0, 50256), max_size=6)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for the files the property tests write
    (function-scoped tmp_path does not mix with @given)."""
    return str(tmp_path_factory.mktemp("bad_input"))


def write_file(folder, name, content):
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(content)
    return path


# --- loaders: any JSON -> VLMError or checked, tokenized records ------------------------------------
@SETTINGS
@given(task=st.sampled_from(list(TASKS)), value=json_values)
def test_load_task_data_on_any_json(tokenizer, workdir, task, value):
    path = write_file(workdir, "any.json",
                      json.dumps({"train": [value]} if isinstance(value, dict) else value))
    try:
        data = TASKS[task].load_data(path, tokenizer, ["train"])
    except VLMError as error:
        assert str(error).startswith(path)
        return
    assert isinstance(data["train"], list) and data["train"]


@SETTINGS
@given(task=st.sampled_from(list(TASKS)), records=st.lists(st.fixed_dictionaries({
    "src": st.one_of(st.text(max_size=10),
                     st.dictionaries(st.sampled_from(SLOTS), st.text(max_size=6), max_size=3)),
    "tgt": st.text(max_size=10), "personality": st.lists(st.text(max_size=6), max_size=2),
    "document": st.lists(st.text(max_size=6), max_size=2),
    "utterances": st.lists(st.fixed_dictionaries({"history": st.lists(st.text(max_size=6), max_size=3),
                                                  "candidates": st.lists(st.text(max_size=6), max_size=2)}),
                           max_size=2)}), min_size=1, max_size=3))
def test_well_shaped_records_load_and_build_examples_or_fail_clearly(tokenizer, workdir, task, records):
    path = write_file(workdir, "shaped.json", json.dumps({"train": records}))
    spec = TASKS[task]
    try:
        data = spec.load_data(path, tokenizer, ["train"])
        examples = spec.training_examples(data["train"], spec.max_history, max_positions=64, where=path)
    except VLMError as error:
        assert path in str(error)
        return
    for example in examples:
        assert len(example["input_ids"]) == len(example["token_type_ids"]) == len(example["labels"]) <= 64


# --- the input builder on any token lists --------------------------------------------------------
dialogue_contexts = st.tuples(st.lists(token_lists, max_size=3), st.lists(token_lists, max_size=5))
contexts = {  # by task: its kind's context
    "mt": token_lists, "summarization": token_lists,
    "nlg": st.lists(st.tuples(st.sampled_from(SLOTS), token_lists), max_size=4),
    "dialogue": dialogue_contexts, "qa": dialogue_contexts,
}


@SETTINGS
@given(data=st.data(), task=st.sampled_from(list(TASKS)), reply=token_lists, with_eos=st.booleans())
def test_build_inputs_layout_invariants(data, task, reply, with_eos):
    spec = TASKS[task]
    context = data.draw(contexts[task])
    example = spec.build_inputs(context, reply, with_eos=with_eos)
    ids, types, labels = example["input_ids"], example["token_type_ids"], example["labels"]
    assert len(ids) == len(types) == len(labels)
    tail = list(reply) + ([special_token_id(spec.special_tokens[1])] if with_eos else [])
    assert ids[len(ids) - len(tail):] == tail
    # Only the reply (and its eos) is learned; the reply's segment token before it is not.
    assert labels == [IGNORE_INDEX] * (len(ids) - len(tail)) + tail
    assert ids[0] == special_token_id(spec.special_tokens[0])


@SETTINGS
@given(task=st.sampled_from(["mt", "summarization", "nlg"]),
       pairs=st.lists(st.tuples(token_lists, token_lists), min_size=1, max_size=4),
       max_positions=st.integers(1, 12))
def test_training_examples_fit_or_fail_clearly(task, pairs, max_positions):
    spec = TASKS[task]
    records = [{"src": src if task != "nlg" else {"name": src}, "tgt": tgt} for src, tgt in pairs]
    contexts_seen = list(spec.iter_contexts(records, 0))
    try:
        examples = spec.training_examples(records, 0, max_positions=max_positions, where="here")
    except VLMError as error:
        assert str(error) == "here: no usable examples"
        return
    assert 0 < len(examples) <= len(contexts_seen)
    assert all(len(e["input_ids"]) <= max_positions for e in examples)


# --- the MR and user-input parsers ------------------------------------------------------------------
mr_texts = st.one_of(st.text(max_size=30), st.lists(st.tuples(st.sampled_from(SLOTS + ["bogus", ""]),
                                                              st.text(max_size=6)), max_size=3).map(
    lambda slots: ", ".join(f"{s}[{v}]" for s, v in slots)))


@SETTINGS
@given(text=mr_texts)
def test_evaluation_parse_mr(text):
    try:
        slots = TASKS["nlg"].parse_mr(text, "--input")
    except VLMError as error:
        assert str(error).startswith("--input: ")
        return
    assert slots and all(slot in TASKS["nlg"].slot_tokens for slot, _ in slots)


user_items = st.one_of(mr_texts, json_values, st.dictionaries(
    st.sampled_from(["src", "history", "personality", "document"]),
    st.one_of(scalars, st.lists(scalars, max_size=3),
              st.dictionaries(st.sampled_from(SLOTS + ["bogus"]), scalars, max_size=2)), max_size=4))


@settings(SETTINGS, max_examples=150)
@given(task=st.sampled_from(list(TASKS)), item=user_items)
def test_user_prompt_on_any_item(tokenizer, task, item):
    try:
        prompt = TASKS[task].input_prompt(item, tokenizer, 1, TASKS[task].task_id, "stdin line 1")
    except VLMError as error:
        assert str(error).startswith("stdin line 1: ")
        return
    assert len(prompt.input_ids) == len(prompt.token_type_ids) > 0


# --- data/prepare.py's converters ---------------------------------------------------------------------
lines = st.lists(st.one_of(st.text(max_size=20), st.sampled_from(
    ["mr,ref", "\"name[X], eatType[pub]\",X is a pub.", "1 your persona: i like tea.", "1 hi\thello",
     "2 how are you?\tfine\t\tok|fine", '{"article": "a b", "highlights": "c"}', "\"unclosed", "\t",
     "\x00"])),
    max_size=5)


@SETTINGS
@given(reader=st.sampled_from(["e2e.csv", "parlai.txt", "summary.jsonl", "personachat.json", "coqa.json"]),
       content=lines)
def test_prepare_readers_on_any_lines(workdir, reader, content):
    path = write_file(workdir, reader, "\n".join(content))
    read = {"e2e.csv": prepare.read_e2e, "parlai.txt": prepare.read_parlai,
            "summary.jsonl": prepare.read_summary_jsonl, "personachat.json": prepare.read_personachat_json,
            "coqa.json": prepare.read_coqa}[reader]
    try:
        records = read((path,), "train")
    except VLMError as error:
        assert str(error).startswith(path)
        return
    assert isinstance(records, list)
    assert all(isinstance(r, dict) for r in records)


@pytest.mark.parametrize("reader, name", [(prepare.read_personachat_json, "deep.json"),
                                          (prepare.read_coqa, "deep.json"),
                                          (prepare.read_summary_jsonl, "deep.jsonl")])
def test_prepare_json_nested_too_deeply(workdir, reader, name):
    path = write_file(workdir, name, "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(VLMError, match="bad JSON: nested too deeply"):
        reader((path,), "train")


@SETTINGS
@given(src=st.lists(st.text(max_size=12), max_size=4), tgt=st.lists(st.text(max_size=12), max_size=4))
def test_prepare_parallel_text_on_any_lines(workdir, src, tgt):
    pair = (write_file(workdir, "pair.en", "\n".join(src)), write_file(workdir, "pair.de", "\n".join(tgt)))
    try:
        records = prepare.read_text_pair(pair, "train")
    except VLMError as error:
        assert pair[0] in str(error) or pair[1] in str(error)
        return
    assert all(r["src"] and r["tgt"] for r in records)


@SETTINGS
@given(text=st.one_of(mr_texts, st.text(max_size=30)))
def test_prepare_parse_mr_and_parlai_turn(text):
    for parse in (lambda: prepare.parse_mr(text, "here"), lambda: prepare.parse_parlai_turn(text, "here")):
        try:
            result = parse()
        except VLMError as error:
            assert str(error).startswith("here: ")
            continue
        assert result


# --- the command lines: a table of bad files and flags ---------------------------------------------------
NLG_OK = [{"src": {"name": "The Vaults", "eatType": "pub"}, "tgt": "The Vaults is a pub."},
          {"src": {"name": "Zizzi", "area": "riverside"}, "tgt": "Zizzi is by the river."}]
LONG = " ".join(["word"] * 600)  # over the tiny model's 512 positions


@pytest.fixture(scope="module")
def nlg_checkpoint(tmp_path_factory, tiny_base, tokenizer):
    path = str(tmp_path_factory.mktemp("nlg_ckpt"))
    save_checkpoint(VersatileLM.from_pretrained(tiny_base, adapter_specs({"nlg": 4})), tokenizer, path,
                    "adapter", ["nlg"], tiny_base)
    return path


def dataset(tmp_path, content, name="data.json"):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


def one_error(main, argv, capsys):
    """Run a script's main in-process: it must exit 2 with exactly one `error:` line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


TRAIN_DATA_CASES = [  # (dataset file content, expected part of the error line)
    ("{not json", "invalid JSON at line 1 column 2"),
    (b'{"train": "\xff\xfe"}', "not UTF-8 text (byte 11)"),
    ("", "invalid JSON at line 1 column 1"),
    ([NLG_OK], "expected a JSON object of splits, got list"),
    ({"train": NLG_OK}, "no 'valid' split (has: train)"),
    ({"train": [], "valid": NLG_OK}, "split 'train' is empty"),
    ({"train": {"a": 1}, "valid": NLG_OK}, "split 'train' must be a list of records"),
    ({"train": NLG_OK, "valid": ["text"]}, "split 'valid' record 0: expected an object, got str"),
    ({"train": [{"src": {"name": "X"}}], "valid": NLG_OK}, "record 0: missing key 'tgt'"),
    ({"train": [{"src": {"name": "X"}, "tgt": 5}], "valid": NLG_OK}, "'tgt' must be a string, got int"),
    ({"train": [{"src": "name[X]", "tgt": "X"}], "valid": NLG_OK}, "'src' must be a non-empty object"),
    ({"train": [{"src": {}, "tgt": "X"}], "valid": NLG_OK}, "'src' must be a non-empty object"),
    ({"train": [{"src": {"cuisine": "thai"}, "tgt": "X"}], "valid": NLG_OK}, "unknown NLG slot 'cuisine'"),
    ({"train": [{"src": {"name": None}, "tgt": "X"}], "valid": NLG_OK},
     "'src.name' must be a string, got NoneType"),
    ('{"train": [{"src": {"name": "a\\ud800"}, "tgt": "X"}], "valid": [{"src": {"name": "b"}, "tgt": "Y"}]}',
     "holds a lone surrogate escape"),
    ("[" * 5000 + "]" * 5000, "JSON nested too deeply"),
    ('{"train": [{"src": {"name": "X"}, "tgt": "Y", "extra": ' + "[" * 900 + "]" * 900 + '}], "valid": '
     + json.dumps(NLG_OK) + "}", "JSON nested too deeply"),
    ({"train": [{"src": {"name": LONG}, "tgt": "X"}], "valid": NLG_OK}, "split 'train': no usable examples"),
]


@pytest.mark.parametrize("content, expected", TRAIN_DATA_CASES, ids=[e for _, e in TRAIN_DATA_CASES])
def test_train_bad_dataset(tmp_path, tiny_base, capsys, content, expected):
    path = dataset(tmp_path, content)
    line = one_error(train.main, ["--task", "nlg", "--dataset_path", path, "--dataset_cache", "",
                                  "--model_checkpoint", tiny_base, "--device", "cpu",
                                  "--adapter_bottleneck", "4",
                                  "--output_dir", str(tmp_path / "out"), "--n_epochs", "1"], capsys)
    assert line.startswith(f"error: {path}") and expected in line, line
    assert not (tmp_path / "out").exists()


TRAIN_FLAG_CASES = [  # (extra flags, expected part of the error line)
    (["--task", "poetry"], "--task: unknown task 'poetry'"),
    (["--train_batch_size", "0"], "--train_batch_size must be at least 1, got 0"),
    (["--train_batch_size", "two"], "argument --train_batch_size: invalid int value: 'two'"),
    (["--valid_batch_size", "-1"], "--valid_batch_size must be at least 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--max_norm", "inf"], "--max_norm must be a positive number, got inf"),
    (["--n_epochs", "-1"], "--n_epochs must be 0 or more"),
    (["--max_history", "-2"], "--max_history must be 0 or more"),
    (["--adapter_bottleneck", "-3"], "--adapter_bottleneck must be 0 (full fine-tuning) or positive, got -3"),
    (["--emb_only", "--outputlayer_only", "--adapter_bottleneck", "0"], "exclude each other"),
    (["--emb_only"], "--emb_only trains no per-task modules; drop --adapter_bottleneck 4"),
    (["--random_init"], "--random_init trains a backbone from scratch"),
    (["--fp16", "O5"], "--fp16: expected '' (off) or an apex opt level"),
    (["--fp16", "O1", "--device", "cpu"], "--fp16 needs a CUDA device"),
    (["--device", "mps"], "--device mps: only cpu and cuda devices are supported"),
    (["--device", "nonsense"], "--device nonsense: not a device name"),
    (["--device", "cuda:99"], "--device cuda:99: "),
    (["--resume", "--output_dir", ""], "--resume needs --output_dir"),
    (["--dataset_path", "/nonexistent/data.json"],
     "--dataset_path /nonexistent/data.json: dataset file not found"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
]


@pytest.mark.parametrize("flags, expected", TRAIN_FLAG_CASES, ids=[" ".join(f) for f, _ in TRAIN_FLAG_CASES])
def test_train_bad_flags(tmp_path, tiny_base, capsys, flags, expected):
    path = dataset(tmp_path, {"train": NLG_OK, "valid": NLG_OK})
    line = one_error(train.main, ["--task", "nlg", "--dataset_path", path, "--dataset_cache", "",
                                  "--model_checkpoint", tiny_base, "--device", "cpu",
                                  "--adapter_bottleneck", "4",
                                  "--output_dir", str(tmp_path / "out"), *flags], capsys)
    assert expected in line, line


def test_train_output_dir_not_empty_or_a_file(tmp_path, tiny_base, capsys):
    path = dataset(tmp_path, {"train": NLG_OK, "valid": NLG_OK})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    for out, expected in (("busy", "folder is not empty; choose a new one"),
                          ("file", "exists and is not a folder")):
        line = one_error(train.main, ["--task", "nlg", "--dataset_path", path, "--dataset_cache", "",
                                      "--model_checkpoint", tiny_base, "--output_dir", str(tmp_path / out)],
                         capsys)
        assert line == f"error: --output_dir {tmp_path / out}: {expected}"


def test_train_counts_dropped_long_and_empty_target_examples(tmp_path, tiny_base, caplog):
    """Too long for the model: dropped with a counted warning; an empty tgt: kept, with a counted warning."""
    records = NLG_OK + [{"src": {"name": LONG}, "tgt": "X"}, {"src": {"name": "Y"}, "tgt": " "}]
    path = dataset(tmp_path, {"train": records, "valid": NLG_OK})
    with caplog.at_level(logging.WARNING):
        train.main(["--task", "nlg", "--dataset_path", path, "--dataset_cache", "", "--model_checkpoint",
                    tiny_base, "--device", "cpu", "--adapter_bottleneck", "4",
                    "--output_dir", str(tmp_path / "out"), "--n_epochs", "1", "--train_batch_size", "1"])
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{path}: split 'train': 1 of 4 records have an empty 'tgt'" in messages
    assert f"{path} split 'train': dropped 1 examples longer than the model's 512 positions" in messages
    assert (tmp_path / "out" / "adapters.safetensors").is_file()


EVAL_CASES = [  # (flags, stdin or None, expected part of the error line)
    (["--max_length", "0"], None, "--max_length must be at least 1"),
    (["--batch_size", "0"], None, "--batch_size must be at least 1"),
    (["--min_length", "20", "--max_length", "10"], None, "--min_length must be between 0 and --max_length"),
    (["--temperature", "0", "--sample"], None, "--temperature must be positive"),
    (["--model", "bert"], None, "--model bert: only gpt2 is supported"),
    (["--model_checkpoint", ""], None, "--model_checkpoint is required"),
    (["--task", "poetry"], None, "--task: unknown task 'poetry'"),
    (["--task", "mt"], None, "holds nlg, not mt"),
    (["--model_checkpoint", "/nonexistent/ckpt"], None, "/nonexistent/ckpt"),
    (["--max_length", "ten"], None, "argument --max_length: invalid int value: 'ten'"),
    (["--input", "name[X], cuisine[thai]"], None, "--input: unknown NLG slot 'cuisine'"),
    (["--input", "name[X"], None, "--input: cannot read a meaning representation"),
    (["--input", "-"], "", "--input -: no input lines on stdin"),
    (["--input", "-"], '{"src": \n', "stdin line 1: invalid JSON"),
    (["--input", "-"], '{"src": {"name": 3}}\n', "stdin line 1: bad NLG slot 'name'"),
    (["--input", "-"], '[1, 2]\n', "stdin line 1: expected a string or a JSON object"),
    (["--input", f"name[{LONG}]"], None,
     "decoding: prompt 0 (input '--input') has 603 tokens; the model has only 512 positions"),
    (["--dataset_path", "DATA:{"], None, "invalid JSON at line 1"),
    (["--dataset_path", "DATA:" + json.dumps({"train": NLG_OK})], None, "no 'test' split (has: train)"),
    (["--dataset_path", "DATA:" + json.dumps({"test": NLG_OK + [{"src": {"name": LONG}, "tgt": "X"}]})], None,
     "nlg: prompt 2 (mr 'name[word word word"),
]


@pytest.mark.parametrize("flags, stdin, expected", EVAL_CASES, ids=[e for _, _, e in EVAL_CASES])
def test_evaluate_bad_input(tmp_path, nlg_checkpoint, capsys, monkeypatch, flags, stdin, expected):
    flags = [dataset(tmp_path, f[len("DATA:"):]) if f.startswith("DATA:") else f for f in flags]
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    if "--sample" in flags:
        flags.remove("--sample")
        base = []
    else:
        base = ["--no_sample"]
    argv = ["--task", "nlg", "--model_checkpoint", nlg_checkpoint, "--device", "cpu", "--dataset_cache", "",
            "--output_dir", str(tmp_path / "out"), *base, *flags]
    line = one_error(evaluate.main, argv, capsys)
    assert expected in line, line


def test_replies_are_cut_where_the_positions_end(tmp_path, nlg_checkpoint, tokenizer, capsys, caplog):
    """A prompt that fits but leaves less room than --max_length: decoded up to the last position
    (cached and uncached alike), with a counted warning; the CLI finishes."""
    name = " ".join(["word"] * 500)
    model, _, _ = load_checkpoint(nlg_checkpoint, "cpu")
    prompt = TASKS["nlg"].input_prompt(f"name[{name}]", tokenizer, 1, TASKS["nlg"].task_id, "--input")
    assert len(prompt.input_ids) == 503
    options = DecodingOptions(max_length=20, min_length=20, no_sample=True)  # min_length: no early stop
    with caplog.at_level(logging.WARNING):
        (output,) = generate(model, [prompt], options, progress=False)
    assert len(output) == 512 - 503 and generate_uncached(model, prompt, options) == output
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "decoding: 1 of 1 replies limited to fewer than --max_length 20 tokens by the model's 512 positions"]
    evaluate.main(["--task", "nlg", "--model_checkpoint", nlg_checkpoint, "--device", "cpu", "--no_sample",
                   "--max_length", "20", "--min_length", "20", "--input", f"name[{name}]"])
    assert capsys.readouterr().out.strip()
