"""combine_all.py / models.combine: per-task adapter checkpoints -> one VLM that serves every task
with each task's logits bit-identical to its own checkpoint's; refusals; continual add/replace/remove."""
import json
import os
import shutil

import pytest
import torch
from conftest import run_script, tiny_gpt2, tiny_method_options
from safetensors.torch import load_file, save_file

import combine_all
import models.combine
from engines.specs import builtin_spec
from models.checkpoint import load_checkpoint, save_checkpoint
from models.combine import (
    combine,
    comparable_token_ids,
    load_task_checkpoints,
    sample_inputs,
    task_logits,
    verify,
    write_vlm,
)
from models.methods import METHODS, method_class
from models.vlm import VersatileLM, backbone_fingerprint, load_backbone
from tasks.table import TASKS
from utils.data import load_tokenizer
from utils.errors import VLMError

BOTTLENECKS = {"qa": 6, "mt": 8, "nlg": 4}


def make_task_checkpoint(base, task, bottleneck, folder, seed, tokenizer, mode="adapter"):
    """A trained-looking single-task adapter checkpoint."""
    return make_method_checkpoint(base, task, {"adapter": {"bottleneck": bottleneck}}, folder, seed,
                                  tokenizer, mode)


def make_method_checkpoint(base, task, methods, folder, seed, tokenizer, mode="adapter"):
    """A trained-looking single-task checkpoint of {method: options}: every tensor of the task's
    methods and the task's own rows moved off init."""
    options = {name: method_class(name).resolve(o) for name, o in methods.items()}
    model = VersatileLM.from_pretrained(base, [builtin_spec(task, options)]).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.tasks[task].parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
        wte = model.gpt2.transformer.wte.weight
        rows = TASKS[task].token_ids()
        wte[rows] += torch.randn(len(rows), wte.shape[1], generator=generator)
    save_checkpoint(model, tokenizer, str(folder), mode, [task], base)
    return str(folder)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_base):
    """Folders: one adapter checkpoint per task, a second mt, a full checkpoint, a foreign-backbone one."""
    root = tmp_path_factory.mktemp("combine")
    tokenizer = load_tokenizer()
    paths = {task: make_task_checkpoint(tiny_base, task, b, root / task, seed, tokenizer)
             for seed, (task, b) in enumerate(BOTTLENECKS.items())}
    paths["mt_v2"] = make_task_checkpoint(tiny_base, "mt", 5, root / "mt_v2", 10, tokenizer)
    paths["full"] = make_task_checkpoint(tiny_base, "mt", 8, root / "full", 11, tokenizer, mode="full")
    other_base = root / "other_base"
    tiny_gpt2(seed=1).save_pretrained(other_base)
    paths["other"] = make_task_checkpoint(str(other_base), "summarization", 4, root / "other", 12, tokenizer)
    return paths


@pytest.fixture(scope="module")
def vlm3(ckpts, tmp_path_factory):
    """A VLM combined from the qa, mt and nlg checkpoints: (folder, manifest)."""
    out = str(tmp_path_factory.mktemp("vlm3") / "vlm")
    return out, write_vlm(combine(load_task_checkpoints([ckpts[t] for t in BOTTLENECKS])), out, log=None)


@pytest.fixture(scope="module")
def singles(ckpts):
    return {t: load_checkpoint(ckpts[t])[0] for t in (*BOTTLENECKS, "mt_v2")}


def all_logits(model_or_path):
    """{task: task_logits on its sample inputs} for every task the model has (one load)."""
    model = (load_checkpoint(str(model_or_path))[0] if isinstance(model_or_path, (str, os.PathLike))
             else model_or_path)
    return {t: task_logits(model, m.spec(), *sample_inputs(m.spec())) for t, m in model.tasks.items()}


def test_combined_logits_equal_each_single_task_checkpoint_exactly(vlm3, singles):
    folder, manifest = vlm3
    assert manifest["verification"]["max_abs_logit_difference"] == {"qa": 0.0, "mt": 0.0, "nlg": 0.0}
    vlm, _, config = load_checkpoint(folder)
    assert config["mode"] == "adapter" and ({t: m.methods["adapter"].bottleneck for t, m in vlm.tasks.items()}
                                            == BOTTLENECKS)
    for task in BOTTLENECKS:
        ids, types, _ = sample_inputs(builtin_spec(task))
        with torch.no_grad():
            got = vlm(ids, token_type_ids=types, task_ids=TASKS[task].task_id).logits
            expected = singles[task](ids, token_type_ids=types, task_ids=TASKS[task].task_id).logits
        columns = comparable_token_ids(builtin_spec(task))
        # Every token the task can generate (all GPT-2 tokens and its own special tokens): bit-identical.
        assert len(columns) == 50257 + len(TASKS[task].special_tokens)
        assert torch.equal(got[..., columns], expected[..., columns])
        # The other tasks' special-token columns differ by design: the VLM holds those tasks' trained
        # rows, a single-task checkpoint their init (they are never generated for this task).
        others = [i for t in BOTTLENECKS if t != task for i in TASKS[t].token_ids()]
        assert not torch.equal(got[..., others], expected[..., others])


def test_combined_model_serves_a_mixed_batch(vlm3, singles):
    vlm, _, _ = load_checkpoint(vlm3[0])
    inputs = {t: sample_inputs(builtin_spec(t)) for t in BOTTLENECKS}
    ids = torch.cat([inputs[t][0][:1] for t in BOTTLENECKS])
    types = torch.cat([inputs[t][1][:1] for t in BOTTLENECKS])
    with torch.no_grad():
        mixed = vlm(ids, token_type_ids=types,
                    task_ids=torch.tensor([TASKS[t].task_id for t in BOTTLENECKS])).logits
        for row, task in enumerate(BOTTLENECKS):
            expected = singles[task](ids[row:row + 1], token_type_ids=types[row:row + 1],
                                     task_ids=TASKS[task].task_id).logits[0]
            columns = comparable_token_ids(builtin_spec(task))
            # A row inside a bigger batch goes through other matmul shapes: equal up to float rounding
            # (as in test_model's mixed-batch test); the greedy choices are the same.
            torch.testing.assert_close(mixed[row][:, columns], expected[:, columns], rtol=0, atol=1e-5)
            assert torch.equal(mixed[row][:, columns].argmax(-1), expected[:, columns].argmax(-1))


def test_checkpoint_with_all_special_rows_combines_its_own_rows_only(ckpts, tiny_base, tmp_path, tokenizer,
                                                                     capsys):
    """A converted authors' checkpoint stores all 30 added rows (`special_token_rows`), moved by
    their training; the VLM takes only the task's own rows, as the authors' combine_all.py did."""
    folder = make_task_checkpoint(tiny_base, "dialogue", 4, tmp_path / "dialogue", 20, tokenizer)
    weights = os.path.join(folder, "adapters.safetensors")
    tensors = load_file(weights)
    tensors["special_token_rows"] = torch.randn(30, 64, generator=torch.Generator().manual_seed(21))
    save_file(tensors, weights)
    run_cli(folder, ckpts["mt"], "--output_dir", tmp_path / "vlm")
    out = capsys.readouterr().out
    assert f"note: {folder} stores all special-token rows" in out
    assert "verified dialogue: largest |logit difference| 0.0" in out
    vlm, source = load_checkpoint(str(tmp_path / "vlm"))[0], load_checkpoint(folder)[0]
    ids, types, _ = sample_inputs(builtin_spec("dialogue"))
    with torch.no_grad():
        got = vlm(ids, token_type_ids=types, task_ids=TASKS["dialogue"].task_id).logits
        expected = source(ids, token_type_ids=types, task_ids=TASKS["dialogue"].task_id).logits
    columns = comparable_token_ids(builtin_spec("dialogue"))
    assert torch.equal(got[..., columns], expected[..., columns])
    # <pad>: the source's moved row is not taken
    assert not torch.equal(got[..., 50257], expected[..., 50257])


def test_verify_fails_on_any_difference(vlm3, ckpts):
    vlm, _, _ = load_checkpoint(vlm3[0])
    with torch.no_grad():
        vlm.tasks["nlg"].methods["adapter"][1].project_up.bias[0] += 1e-3
    with pytest.raises(VLMError, match=r"differ.*nlg \(largest difference [0-9.e-]+\)") as error:
        verify(vlm, {"mt": ckpts["mt"], "nlg": ckpts["nlg"]})
    assert "mt" not in str(error.value)  # mt's logits stayed identical


def test_cli_writes_checkpoint_and_manifest(ckpts, tmp_path, tiny_base):
    out = tmp_path / "vlm"
    result = run_script("combine_all.py", ckpts["mt"], ckpts["nlg"], "--output_dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "verified mt: largest |logit difference| 0.0" in result.stdout
    assert "verified nlg: largest |logit difference| 0.0" in result.stdout
    assert "2 separately fine-tuned copies" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    backbone = load_backbone(tiny_base)
    d, n_layer = 64, 2
    backbone_parameters = tiny_gpt2().num_parameters()  # GPT-2's own 50,257 rows, tied head counted once
    assert manifest["backbone"] == {"name": tiny_base, "fingerprint": backbone_fingerprint(backbone),
                                    "parameters": backbone_parameters, "bytes": 4 * backbone_parameters}
    expected_tasks = []
    for task in ("mt", "nlg"):  # task-id order
        b = BOTTLENECKS[task]
        adapter = n_layer * (2 * d + (d * b + b) + (b * d + d))  # layer norm, project down, project up
        embedding = len(TASKS[task].special_tokens) * d
        expected_tasks.append({"name": task, "task_id": TASKS[task].task_id,
                               "methods": {"adapter": {"bottleneck": b}}, "bottleneck": b,
                               "adapter_parameters": adapter, "task_embedding_parameters": embedding,
                               "parameters": adapter + embedding, "bytes": 4 * (adapter + embedding),
                               "source": ckpts[task]})
    assert manifest["tasks"] == expected_tasks
    extra = sum(t["parameters"] for t in expected_tasks)
    assert manifest["extra_parameters"] == extra
    assert manifest["total_parameters"] == backbone_parameters + extra
    assert manifest["separate_models_parameters"] == 2 * backbone_parameters
    assert manifest["adapters_file_bytes"] == os.path.getsize(out / "adapters.safetensors")
    assert f"{extra:,}" in result.stdout and f"2 x {backbone_parameters:,}" in result.stdout
    config = json.loads((out / "vlm_config.json").read_text())
    assert {t: (e["task_id"], e["methods"], e["bottleneck"]) for t, e in config["tasks"].items()} == \
        {"mt": (2, {"adapter": {"bottleneck": 8}}, 8), "nlg": (4, {"adapter": {"bottleneck": 4}}, 4)}
    assert sorted(os.listdir(tmp_path)) == ["vlm"]  # no temporary folder left beside it


def test_cli_refuses_another_backbone_without_traceback(ckpts, tmp_path):
    out = tmp_path / "vlm"
    result = run_script("combine_all.py", ckpts["mt"], ckpts["other"], "--output_dir", str(out))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert ckpts["other"] in result.stderr and "another backbone" in result.stderr
    assert not out.exists()


def corrupt_config(tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "vlm_config.json").write_text('{"format": "vlm", "mode": ')
    return str(folder)


def random_folder(tmp_path):
    folder = tmp_path / "random"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a checkpoint\n")
    return str(folder)


@pytest.mark.parametrize("make_args, where, message", [
    (lambda tmp, c: [c["mt"], c["other"]], lambda tmp, c: c["other"], "another backbone"),
    (lambda tmp, c: [c["mt"], c["nlg"], c["mt_v2"]], lambda tmp, c: c["mt_v2"],
     "a second checkpoint for task mt"),
    (lambda tmp, c: [c["nlg"], c["full"]], lambda tmp, c: c["full"], "a full checkpoint (a whole GPT-2"),
    (lambda tmp, c: [c["nlg"], random_folder(tmp)], lambda tmp, c: str(tmp / "random"), "no vlm_config.json"),
    (lambda tmp, c: [c["nlg"], str(tmp / "missing")], lambda tmp, c: str(tmp / "missing"),
     "no such checkpoint"),
    (lambda tmp, c: [corrupt_config(tmp)], lambda tmp, c: str(tmp / "corrupt" / "vlm_config.json"),
     "invalid JSON"),
    (lambda tmp, c: [c["nlg"], "--remove", "mt"], lambda tmp, c: "--remove", "pass --vlm"),
    (lambda tmp, c: [c["nlg"], "--output_dir", c["mt"]], lambda tmp, c: c["mt"], "exists and is not empty"),
])
def test_refusals_are_one_error_line_naming_the_path(ckpts, tmp_path, capsys, make_args, where, message):
    out = tmp_path / "vlm"
    with pytest.raises(SystemExit) as exit_info:
        args = make_args(tmp_path, ckpts)
        combine_all.main(args if "--output_dir" in args else [*args, "--output_dir", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert where(tmp_path, ckpts) in err and message in err
    assert not out.exists()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no temporary folder left


def run_cli(*args):
    combine_all.main([str(a) for a in args])


def test_continual_remove_add_replace_keep_other_tasks_bit_identical(vlm3, ckpts, singles, tmp_path, capsys):
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    shutil.copytree(vlm3[0], v1)  # qa, mt, nlg
    before = all_logits(v1)

    run_cli("--vlm", v1, "--remove", "nlg", "--output_dir", v2)  # into a new folder
    vlm, _, config = load_checkpoint(str(v2))
    assert set(config["tasks"]) == {"qa", "mt"}
    with pytest.raises(VLMError, match="has no module"):
        vlm(*sample_inputs(builtin_spec("nlg"))[:2], task_ids=TASKS["nlg"].task_id)
    removed = all_logits(vlm)
    assert torch.equal(removed["qa"], before["qa"]) and torch.equal(removed["mt"], before["mt"])
    out = capsys.readouterr().out
    assert "verified qa: largest |logit difference| 0.0" in out and "verified nlg" not in out

    run_cli("--vlm", v2, ckpts["nlg"], "--output_dir", v2)  # add it back, in place
    added = all_logits(v2)
    assert set(added) == {"qa", "mt", "nlg"}
    assert all(torch.equal(added[t], before[t]) for t in ("qa", "mt", "nlg"))
    manifest = json.loads((v2 / "manifest.json").read_text())
    # provenance of kept tasks is carried over from the old manifest
    assert {t["name"]: t["source"] for t in manifest["tasks"]} == {t: ckpts[t] for t in ("qa", "mt", "nlg")}

    run_cli("--vlm", v2, "--replace", ckpts["mt_v2"], "--output_dir", v2)  # in place
    vlm = load_checkpoint(str(v2))[0]
    assert {t: m.methods["adapter"].bottleneck for t, m in vlm.tasks.items()} == {"qa": 6, "mt": 5, "nlg": 4}
    replaced = all_logits(vlm)
    assert torch.equal(replaced["nlg"], before["nlg"]) and torch.equal(replaced["qa"], before["qa"])
    assert torch.equal(replaced["mt"], all_logits(singles["mt_v2"])["mt"])
    assert not torch.equal(replaced["mt"], before["mt"])
    assert sorted(os.listdir(tmp_path)) == ["v1", "v2"]  # old VLM folders swapped out and removed


# Twelve methods over the five built-in tasks (a task composes several; at most one of them adds
# virtual tokens and one adds prefixes).
METHODS_BY_TASK = {"qa": "adapter+lora", "mt": "houlsby+prefix+ln", "nlg": "ptuning+krona+adapterbias",
                   "dialogue": "parallel+compacter+prompt", "summarization": "unipelt"}


def test_tasks_of_every_method_combine_and_continual_edits_keep_the_others_bit_identical(tiny_base, tmp_path):
    assert sorted(m for spec in METHODS_BY_TASK.values() for m in spec.split("+")) == sorted(METHODS)
    tokenizer = load_tokenizer()
    ckpts = {task: make_method_checkpoint(tiny_base, task, tiny_method_options(spec), tmp_path / task, seed,
                                          tokenizer)
             for seed, (task, spec) in enumerate(METHODS_BY_TASK.items())}
    singles = {task: all_logits(path)[task] for task, path in ckpts.items()}
    vlm = tmp_path / "vlm"
    run_cli(*ckpts.values(), "--output_dir", vlm)
    model, _, config = load_checkpoint(str(vlm))
    assert {t: "+".join(entry["methods"]) for t, entry in config["tasks"].items()} == METHODS_BY_TASK
    before = all_logits(model)
    for task in METHODS_BY_TASK:
        assert torch.equal(before[task], singles[task]), task

    run_cli("--vlm", vlm, "--remove", "nlg", "--output_dir", vlm)  # p-tuning's prompt-table row leaves
    removed = all_logits(vlm)
    assert set(removed) == set(METHODS_BY_TASK) - {"nlg"}
    assert all(torch.equal(removed[t], before[t]) for t in removed)
    run_cli("--vlm", vlm, ckpts["nlg"], "--output_dir", vlm)  # and comes back
    added = all_logits(vlm)
    assert set(added) == set(METHODS_BY_TASK) and all(torch.equal(added[t], before[t]) for t in added)

    # mt's houlsby+prefix+ln replaced by a LoRA: mt gives the new checkpoint's logits, the rest stay
    lora = make_method_checkpoint(tiny_base, "mt", tiny_method_options("lora"), tmp_path / "mt_lora", 9,
                                  tokenizer)
    run_cli("--vlm", vlm, "--replace", lora, "--output_dir", vlm)
    model = load_checkpoint(str(vlm))[0]
    assert list(model.tasks["mt"].methods) == ["lora"]
    replaced = all_logits(model)
    assert torch.equal(replaced["mt"], all_logits(lora)["mt"]) and not torch.equal(replaced["mt"],
                                                                                   before["mt"])
    assert all(torch.equal(replaced[t], before[t]) for t in replaced if t != "mt")


def test_a_failed_verification_writes_nothing(vlm3, ckpts, tmp_path, capsys, monkeypatch):
    vlm = tmp_path / "vlm"
    shutil.copytree(vlm3[0], vlm)
    files = {name: (vlm / name).read_bytes() for name in os.listdir(vlm)}

    def differs(model, sources, backbone=None, log=None):
        raise VLMError("the combined model's logits differ from the source checkpoint's for qa")
    monkeypatch.setattr(models.combine, "verify", differs)
    for args in (["--vlm", vlm, "--remove", "nlg", "--output_dir", vlm],
                 [ckpts["qa"], "--output_dir", tmp_path / "new"]):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(*args)
        assert exit_info.value.code == 2 and "differ" in capsys.readouterr().err
    assert {name: (vlm / name).read_bytes() for name in os.listdir(vlm)} == files
    assert sorted(os.listdir(tmp_path)) == ["vlm"]  # no new VLM, no temporary folder


@pytest.mark.parametrize("args, message", [
    (lambda c, v: ["--vlm", v, "--remove", "summarization"], "has no task summarization"),
    (lambda c, v: ["--vlm", v, "--remove", "mt", "--remove", "nlg", "--remove", "qa"], "without any task"),
    (lambda c, v: ["--vlm", v, "--remove", "mt", c["mt_v2"]], "use --replace"),
    (lambda c, v: ["--vlm", v], "nothing to change"),
    (lambda c, v: ["--vlm", v, c["other"]], "another backbone"),
    (lambda c, v: ["--vlm", v, c["mt_v2"]], "pass --replace"),
])
def test_continual_refusals_leave_the_vlm_untouched(vlm3, ckpts, tmp_path, capsys, args, message):
    vlm = tmp_path / "vlm"
    shutil.copytree(vlm3[0], vlm)
    files = {name: (vlm / name).read_bytes() for name in os.listdir(vlm)}
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args(ckpts, vlm), "--output_dir", vlm)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert {name: (vlm / name).read_bytes() for name in os.listdir(vlm)} == files
    assert sorted(os.listdir(tmp_path)) == ["vlm"]
