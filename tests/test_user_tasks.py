"""User tasks from a task file, through every script: train.py trains a user task's own method on
the frozen backbone (nothing else moves), the checkpoint records the template, evaluate.py decodes
and scores it (also zero- and few-shot, --shots k), combine_all.py learns tasks one after another
into one VLM (add, replace, remove) with earlier tasks bit-identical, tasks of different
virtual-token counts share batches with single-task outputs, and train_vlm.py mixes user and
built-in tasks in one batch."""
import json
import os

import pytest
import torch
from conftest import run_script
from safetensors.torch import load_file

import train
import train_vlm
from engines import training
from engines.generate import DecodingOptions, generate
from engines.multitask import run_multitask
from models.checkpoint import load_checkpoint
from models.combine import combine, load_task_checkpoint, load_task_checkpoints, write_vlm
from models.vlm import VersatileLM
from tasks.task_file import load_task_file
from tasks.template import EOS_ID, FIRST_USER_TASK_ID, few_shot_text
from utils.data import load_tokenizer
from utils.metrics import intent_slot_scores, label_accuracy

TASK_FILE = {"task_templates": [
    {"taskname": "sentiment", "prompt_template": "<|VIRTUAL_PROMPT_0|> {sentence} sentiment: {label}",
     "total_virtual_tokens": 4, "virtual_token_splits": [4], "truncate_field": "sentence",
     "answer_only_loss": True,
     "answer_field": "label", "method": "ptuning", "method_options": {"hidden": 16}, "metric": "accuracy",
     "label_map": {"positivt": "positive"}, "max_answer_tokens": 4},
    {"taskname": "intent_and_slot",
     "prompt_template": ("<|VIRTUAL_PROMPT_0|> Predict intent and slot <|VIRTUAL_PROMPT_1|> :\n"
                         "{utterance}\n{label}"),
     "total_virtual_tokens": 3, "virtual_token_splits": [2, 1], "answer_field": "label", "method": "prompt",
     "metric": "intent_slot", "max_answer_tokens": 12, "stop": []},
    {"taskname": "echo", "prompt_template": "say <|VIRTUAL_PROMPT_0|> {text} again: {answer}",
     "total_virtual_tokens": 2, "virtual_token_splits": [2], "answer_field": "answer", "method": "lora",
     "method_options": {"r": 2}, "metric": "exact_match", "max_answer_tokens": 4}]}

SENTENCES = [("Profit rose sharply .", "positive"), ("Sales fell by half .", "negative"),
             ("The meeting is on Monday .", "neutral"), ("Operating profit grew .", "positive"),
             ("The company cut jobs .", "negative"), ("Shares were unchanged .", "neutral")]
UTTERANCES = [("wake me up at seven", "Intent: alarm_set\nSlots: time(seven)"),
              ("play some jazz", "Intent: play_music\nSlots: music_genre(jazz)"),
              ("what is the weather", "Intent: weather_query\nSlots: None"),
              ("turn the lights off", "Intent: iot_hue_lightoff\nSlots: None")]
WORDS = ["apple", "river", "stone", "cloud", "green", "house"]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """A task file and one dataset folder per task (train, valid, test)."""
    root = tmp_path_factory.mktemp("user_tasks")
    (root / "tasks.json").write_text(json.dumps(TASK_FILE), encoding="utf-8")
    rows = {"sentiment": [{"taskname": "sentiment", "sentence": s, "label": label} for s, label in SENTENCES],
            "intent_and_slot": [{"taskname": "intent_and_slot", "utterance": u, "label": label}
                                for u, label in UTTERANCES],
            "echo": [{"taskname": "echo", "text": w, "answer": w} for w in WORDS]}
    for name, records in rows.items():
        for split in ("train", "valid", "test"):
            write_jsonl(root / name / f"{split}.jsonl", records)
    return root


def train_user_task(tmp_path, user_data, base, task, *extra, out=None, data=None):
    argv = ["--task", task, "--task_file", str(user_data / "tasks.json"),
            "--dataset_path", str(data or user_data / task),
            "--model_checkpoint", base, "--device", "cpu", "--output_dir", str(out or tmp_path / task),
            "--train_batch_size", "2", "--gradient_accumulation_steps", "1", "--n_epochs", "4", "--lr", "0.1",
            "--eval_before_start", *extra]
    return training.run_training(train.parse_args(argv))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, user_data, tiny_base):
    """Each user task trained on its own: {task: TrainResult}."""
    root = tmp_path_factory.mktemp("trained")
    return {task: train_user_task(root, user_data, tiny_base, task)
            for task in ("sentiment", "intent_and_slot", "echo")}


def task_prompts(model, tokenizer, user_data, task_name, split="test"):
    task = load_task_file(user_data / "tasks.json")[task_name]
    records = task.load_data(str(user_data / task_name), tokenizer, [split])[split]
    return task.dataset_prompts(records, 0, tokenizer, model.task_id(task_name))


def test_a_user_task_trains_its_method_only_and_its_checkpoint_describes_it(trained, tiny_base, user_data):
    result = trained["sentiment"]
    assert result.metrics[-1]["val_nll"] < result.metrics[0]["val_nll"] - 0.15  # it learned (0.21 measured)
    model = result.model
    base = VersatileLM.from_pretrained(tiny_base)
    for name, tensor in base.gpt2.state_dict().items():  # every backbone tensor and every vocabulary row
        assert torch.equal(model.gpt2.state_dict()[name], tensor), name
    config = json.load(open(os.path.join(result.output_dir, "vlm_config.json")))
    entry = config["tasks"]["sentiment"]
    assert entry["task_id"] == FIRST_USER_TASK_ID and entry["token_ids"] == []  # no vocabulary rows
    assert entry["template"]["prompt_template"] == TASK_FILE["task_templates"][0]["prompt_template"]
    # p-tuning keeps only the encoder's output: one frozen prompt-table row of 4 x 64 numbers
    saved = load_file(os.path.join(result.output_dir, "adapters.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"methods.sentiment.ptuning.table": (4, 64)}
    assert os.path.getsize(os.path.join(result.output_dir, "adapters.safetensors")) < 2048
    assert list(entry["methods"]) == ["ptuning"] and entry["methods"]["ptuning"]["reparameterize"] is False


def test_methods_without_virtual_tokens_drop_the_markers(trained, tiny_base):
    model = trained["echo"].model
    assert list(model.tasks["echo"].methods) == ["lora"] and model.tasks["echo"].num_virtual_tokens == 0
    assert trained["echo"].metrics[-1]["val_nll"] < trained["echo"].metrics[0]["val_nll"]


def test_evaluate_scores_a_user_task_from_its_checkpoint_alone(trained, user_data, tmp_path):
    out = tmp_path / "eval"
    done = run_script("evaluate.py", "--task", "intent_and_slot",
                      "--model_checkpoint", trained["intent_and_slot"].output_dir,
                      "--dataset_path", str(user_data / "intent_and_slot"), "--no_sample", "--device", "cpu",
                      "--output_dir", str(out))
    assert done.returncode == 0, done.stderr
    metrics = json.load(open(out / "intent_and_slot_metrics.json"))
    lines = [json.loads(line) for line in open(out / "intent_and_slot_predictions.jsonl", encoding="utf-8")]
    assert len(lines) == metrics["examples"] == len(UTTERANCES)
    expected = intent_slot_scores([x["prediction"] for x in lines], [x["reference"] for x in lines])
    assert {k: metrics[k] for k in expected} == expected
    outputs = open(out / "intent_and_slot_output.txt", encoding="utf-8").read().splitlines()
    assert outputs == [x["prediction"].replace("\\", "\\\\").replace("\n", "\\n") for x in lines]
    assert "intent_accuracy=" in done.stdout


def test_evaluate_input_decodes_one_record_of_a_user_task(trained):
    done = run_script("evaluate.py", "--task", "sentiment", "--model_checkpoint",
                      trained["sentiment"].output_dir, "--no_sample", "--device", "cpu",
                      "--input", "Profit rose sharply .")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1


def test_shots_put_k_solved_training_examples_in_front(user_data, tiny_base, tokenizer, tmp_path):
    task = load_task_file(user_data / "tasks.json")["sentiment"]
    records = [{"taskname": "sentiment", "sentence": "Profit rose .", "label": "positive"}]
    ids = few_shot_text(task, records, tokenizer)
    expected = (tokenizer.encode(" Profit rose .") + tokenizer.encode(" sentiment:")
                + tokenizer.encode(" positive") + tokenizer.encode("\n\n"))
    assert ids == expected and EOS_ID not in ids
    outs = {}
    for shots in (0, 2):
        out = tmp_path / f"shots{shots}"
        done = run_script("evaluate.py", "--task", "sentiment", "--task_file", str(user_data / "tasks.json"),
                          "--model_checkpoint", tiny_base, "--dataset_path", str(user_data / "sentiment"),
                          "--no_sample", "--device", "cpu", "--shots", str(shots), "--output_dir", str(out))
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in open(out / "sentiment_predictions.jsonl", encoding="utf-8")]
        metrics = json.load(open(out / "sentiment_metrics.json"))
        assert metrics["accuracy"] == label_accuracy([x["prediction"] for x in lines],
                                                     [x["reference"] for x in lines], task.label_map)
        outs[shots] = [x["prediction"] for x in lines]
    assert outs[0] != outs[2]  # the solved examples reach the model


def vlm_outputs(model, tokenizer, user_data, task, sampled=False):
    options = DecodingOptions(max_length=6, no_sample=not sampled, top_k=5)
    return generate(model, task_prompts(model, tokenizer, user_data, task), options, progress=False)


def test_continual_learning_leaves_earlier_tasks_bit_identical(trained, user_data, tiny_base, tmp_path):
    tokenizer = load_tokenizer()
    single = {task: load_checkpoint(trained[task].output_dir)[0] for task in trained}
    alone = {task: vlm_outputs(single[task], tokenizer, user_data, task) for task in trained}
    # 1. sentiment alone, 2. add intent_and_slot, 3. replace it (a new run), 4. remove sentiment, 5. add echo
    first = tmp_path / "vlm1"
    write_vlm(combine(load_task_checkpoints([trained["sentiment"].output_dir])), str(first), log=None)
    second = tmp_path / "vlm2"
    write_vlm(combine(load_task_checkpoints([trained["intent_and_slot"].output_dir]),
                      load_task_checkpoint(str(first))),
              str(second), log=None)
    vlm2 = load_checkpoint(str(second))[0]
    assert vlm_outputs(vlm2, tokenizer, user_data, "sentiment") == alone["sentiment"]
    assert vlm_outputs(vlm2, tokenizer, user_data, "intent_and_slot") == alone["intent_and_slot"]
    row = load_file(os.path.join(first, "adapters.safetensors"))["methods.sentiment.ptuning.table"]
    assert torch.equal(
        load_file(os.path.join(second, "adapters.safetensors"))["methods.sentiment.ptuning.table"], row)

    retrained = train_user_task(tmp_path, user_data, tiny_base, "intent_and_slot", "--seed", "7",
                                out=tmp_path / "intent_v2")
    third = tmp_path / "vlm3"
    write_vlm(combine(load_task_checkpoints([retrained.output_dir]), load_task_checkpoint(str(second)),
                      replace=True),
              str(third), log=None)
    vlm3 = load_checkpoint(str(third))[0]
    assert vlm_outputs(vlm3, tokenizer, user_data, "sentiment") == alone["sentiment"]
    new_alone = vlm_outputs(load_checkpoint(retrained.output_dir)[0], tokenizer, user_data, "intent_and_slot")
    assert vlm_outputs(vlm3, tokenizer, user_data, "intent_and_slot") == new_alone

    fourth = tmp_path / "vlm4"
    write_vlm(combine(load_task_checkpoints([trained["echo"].output_dir]), load_task_checkpoint(str(third)),
                      remove=["sentiment"]), str(fourth), log=None)
    vlm4, _, config = load_checkpoint(str(fourth))
    assert sorted(config["tasks"]) == ["echo", "intent_and_slot"]
    assert vlm_outputs(vlm4, tokenizer, user_data, "intent_and_slot") == new_alone
    assert vlm_outputs(vlm4, tokenizer, user_data, "echo") == alone["echo"]
    assert all("template" in entry for entry in config["tasks"].values())


def test_mixed_virtual_token_counts_in_one_batch_equal_single_task_decoding(trained, user_data, tmp_path):
    """4 p-tuned tokens in one split, 3 prompt tokens in two splits, none (LoRA): one batch, each
    row's tokens those of its own checkpoint, greedy and sampled."""
    tokenizer = load_tokenizer()
    vlm = tmp_path / "vlm"
    write_vlm(combine(load_task_checkpoints([trained[t].output_dir for t in trained])), str(vlm), log=None)
    model = load_checkpoint(str(vlm))[0]
    counts = {t: model.tasks[t].num_virtual_tokens for t in trained}
    assert counts == {"sentiment": 4, "intent_and_slot": 3, "echo": 0}
    for sampled in (False, True):
        options = DecodingOptions(max_length=6, no_sample=not sampled, top_k=5)
        mixed, spans = [], {}
        for task in trained:
            prompts = task_prompts(model, tokenizer, user_data, task)
            for index, p in enumerate(prompts):
                p.meta["index"] = index
            spans[task] = slice(len(mixed), len(mixed) + len(prompts))
            mixed += prompts
        together = generate(model, mixed, options, batch_size=len(mixed), progress=False)
        for task in trained:
            single = load_checkpoint(trained[task].output_dir)[0]
            prompts = task_prompts(single, tokenizer, user_data, task)
            for index, p in enumerate(prompts):
                p.meta["index"] = index
            assert together[spans[task]] == generate(single, prompts, options, progress=False), \
                (task, sampled)


def test_train_vlm_mixes_user_and_built_in_tasks_in_one_batch(user_data, tiny_base, tmp_path):
    mt = tmp_path / "mt.json"
    pairs = [{"src": f"a man {w}", "tgt": f"ein mann {w}"} for w in WORDS]
    mt.write_text(json.dumps({"train": pairs, "test": pairs[:2]}), encoding="utf-8")
    args = train_vlm.build_parser().parse_args([
        "--task_file", str(user_data / "tasks.json"), "--tasks", "sentiment", "mt", "echo",
        "--dataset_paths", f"sentiment={user_data / 'sentiment'}", f"mt={mt}", f"echo={user_data / 'echo'}",
        "--model_checkpoint", tiny_base, "--device", "cpu", "--output_dir", str(tmp_path / "run"),
        "--method", "mt=adapter", "--train_batch_size", "6",
        "--gradient_accumulation_steps", "1", "--n_epochs", "2", "--lr", "5e-2",
        "--dataset_cache", str(tmp_path / "c")])
    result = run_multitask(args)
    model = result.model
    assert {t: list(model.tasks[t].methods) for t in ("sentiment", "mt", "echo")} == {
        "sentiment": ["ptuning"], "mt": ["adapter"], "echo": ["lora"]}
    assert {t: model.tasks[t].task_id for t in ("sentiment", "mt", "echo")} == {"sentiment": 5, "mt": 2,
                                                                                "echo": 7}
    first, last = result.metrics[0]["val"], result.metrics[-1]["val"]
    assert all(last[t]["nll"] < first[t]["nll"] for t in ("sentiment", "mt", "echo"))
    config = json.load(open(tmp_path / "run" / "vlm_config.json"))
    assert "template" in config["tasks"]["sentiment"] and "template" not in config["tasks"]["mt"]


@pytest.mark.parametrize("extra, message", [
    ([], "error: --task: unknown task 'sentiment'; choose one of dialogue, qa, mt, summarization, nlg "
         "(a user task needs --task_file FILE)"),
    (["--task_file", "{tasks}", "--emb_only"], "error: --emb_only: task sentiment is a user task"),
    (["--task_file", "{tasks}", "--ptuning_length", "9"],
     "error: --ptuning_length 9: task sentiment's template has total_virtual_tokens 4"),
    (["--task_file", "{tasks}", "--lora_r", "2"],
     "error: --lora_r is an option of lora, which task sentiment's method"),
])
def test_bad_user_task_flags_are_one_error_line(user_data, tiny_base, tmp_path, extra, message):
    extra = [e.replace("{tasks}", str(user_data / "tasks.json")) for e in extra]
    done = run_script("train.py", "--task", "sentiment", "--dataset_path", str(user_data / "sentiment"),
                      "--model_checkpoint", tiny_base, "--device", "cpu", "--output_dir", str(tmp_path / "o"),
                      *extra)
    assert done.returncode == 2 and done.stderr.startswith(message), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_missing_dataset_folder_is_one_error_line(user_data, tiny_base, tmp_path):
    done = run_script("train.py", "--task", "sentiment", "--task_file", str(user_data / "tasks.json"),
                      "--dataset_path", str(tmp_path / "nowhere"), "--model_checkpoint", tiny_base,
                      "--output_dir", str(tmp_path / "o"))
    assert done.returncode == 2 and done.stderr.strip() == (
        f"error: --dataset_path {tmp_path / 'nowhere'}: dataset folder not found "
        f"(task sentiment reads train.jsonl, valid.jsonl and test.jsonl there)")


def test_distilled_answers_are_the_teachers_and_train_with_distillation(trained, user_data, tiny_base,
                                                                        tmp_path):
    import shutil
    data = tmp_path / "sentiment"
    shutil.copytree(user_data / "sentiment", data)
    teacher = trained["sentiment"].output_dir
    done = run_script("sentence_distiller.py", "--task", "sentiment", "--model_checkpoint", teacher,
                      "--dataset_path", str(data), "--no_sample", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    distilled = [json.loads(line)
                 for line in open(tmp_path / "sentiment.distilled" / "train.jsonl", encoding="utf-8")]
    model, tokenizer, _ = load_checkpoint(teacher)
    task = load_task_file(user_data / "tasks.json")["sentiment"]
    records = task.load_data(str(data), tokenizer, ["train"])["train"]
    expected = [task.output_text(tokenizer, ids) for ids in generate(
        model, task.dataset_prompts(records, 0, tokenizer, model.task_id("sentiment")),
        DecodingOptions(max_length=150, no_sample=True), progress=False)]
    assert [r["distillated_tgt"] for r in distilled] == expected
    assert [r["label"] for r in distilled] == [label for _, label in SENTENCES]  # the gold answers stay
    assert ((tmp_path / "sentiment.distilled" / "valid.jsonl").read_bytes()
            == (data / "valid.jsonl").read_bytes())
    train_user_task(tmp_path, user_data, tiny_base, "sentiment", "--distillation", out=tmp_path / "student",
                    data=data)
    args = json.load(open(tmp_path / "student" / "training_args.json"))
    assert args["dataset_path"] == str(tmp_path / "sentiment.distilled")  # found beside the dataset


def test_combine_task_file_updates_what_training_did_not_depend_on(trained, user_data, tmp_path):
    changed = json.loads(json.dumps(TASK_FILE))
    changed["task_templates"][0]["label_map"] = {"good": "positive"}
    (tmp_path / "new.json").write_text(json.dumps(changed), encoding="utf-8")
    done = run_script("combine_all.py", trained["sentiment"].output_dir,
                      "--task_file", str(tmp_path / "new.json"), "--output_dir", str(tmp_path / "vlm"))
    assert done.returncode == 0, done.stderr
    config = json.load(open(tmp_path / "vlm" / "vlm_config.json"))
    assert config["tasks"]["sentiment"]["template"]["label_map"] == {"good": "positive"}
    changed["task_templates"][0]["prompt_template"] = "<|VIRTUAL_PROMPT_0|> {sentence} mood: {label}"
    (tmp_path / "bad.json").write_text(json.dumps(changed), encoding="utf-8")
    done = run_script("combine_all.py", trained["sentiment"].output_dir,
                      "--task_file", str(tmp_path / "bad.json"), "--output_dir", str(tmp_path / "vlm2"))
    assert done.returncode == 2 and done.stderr.startswith(f"error: {tmp_path / 'bad.json'}: "
                                                           "task 'sentiment': prompt_template is ")
    assert not (tmp_path / "vlm2").exists()
