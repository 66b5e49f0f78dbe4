"""peft_io.py: our task checkpoints as Hugging Face PEFT adapter folders, and back.

Export: PEFT's own loader (PeftModel.from_pretrained on the tiny GPT-2's folder) computes our
logits (1e-5) for LoRA, prefix, prompt, p-tuning and LN tuning, a built-in task's special-token
rows riding along as LoRA's trainable_token_indices; what PEFT cannot express is one error line.
Import: adapters PEFT trained itself give PEFT's logits in our model; export then import gives
back a checkpoint with equal logits, which evaluate.py decodes as the original, and an imported
LoRA task combines with another and decodes in a mixed batch as alone. Every method's tensors are
moved off their init first (LoRA's B starts at zero), so a mapping that drops one fails."""
import dataclasses
import json
import os
import random
import shutil
import warnings

import pytest
import torch
from conftest import run_script
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

import combine_all
import evaluate
import peft_io
import train
from engines import training
from engines.generate import DecodingOptions, generate
from engines.specs import task_spec
from models.checkpoint import load_checkpoint, save_checkpoint
from models.combine import combine, comparable_token_ids, load_task_checkpoints, sample_inputs, write_vlm
from models.methods import method_class
from models.vlm import VersatileLM, add_special_token_rows
from tasks.table import TASKS
from tasks.task_file import load_task_file
from tasks.template import template_item
from utils.data import load_tokenizer
from utils.vocab import GPT2_VOCAB_SIZE, PAD_ID, VOCAB_SIZE, builtin_token_ids

VIRTUAL = 4
TEMPLATE = "<|VIRTUAL_PROMPT_0|> {text} first word: {answer}"
OPTIONS = {"lora": {"r": 2, "targets": ["q", "v", "mlp_fc"]}, "prefix": {"length": 3, "hidden": 16},
           "prompt": {"length": VIRTUAL}, "ptuning": {"length": VIRTUAL, "hidden": 16}, "ln": {}}
PEFT_TYPES = {"lora": "LORA", "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING",
              "ptuning": "PROMPT_TUNING", "ln": "LN_TUNING"}


def user_task(name, method, template=TEMPLATE, virtual=VIRTUAL):
    return {"taskname": name, "prompt_template": template, "total_virtual_tokens": virtual,
            "virtual_token_splits": [virtual], "answer_field": "answer", "method": method,
            "max_answer_tokens": 4}


TASK_FILE = {"task_templates": [user_task(f"echo_{m}", m) for m in OPTIONS] + [
    user_task("echo_mixed", "prefix+ln"),
    user_task("late", "prompt", "say {text} <|VIRTUAL_PROMPT_0|> again: {answer}"),
    user_task("short", "prompt", virtual=3)]}
WORDS = ["apple", "river", "stone", "cloud", "green", "house", "quiet", "seven"]


def records(task, count, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = rng.choices(WORDS, k=rng.randint(1, 5))
        out.append({"taskname": task, "text": " ".join(words), "answer": words[0]})
    return out


def make_checkpoint(base, task, methods, folder, seed, exported=True):
    """A trained-looking task checkpoint: every method tensor (and a built-in task's own rows) moved."""
    options = {name: method_class(name).resolve(o) for name, o in methods.items()}
    spec = task_spec(task, options)
    model = VersatileLM.from_pretrained(base, [spec]).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.tasks[spec.name].parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
        wte = model.gpt2.transformer.wte.weight
        rows = list(spec.token_ids)
        wte[rows] += 0.05 * torch.randn(len(rows), wte.shape[1], generator=generator)
    meta = task.checkpoint_meta()
    save_checkpoint(model, load_tokenizer(), str(folder), "adapter", [spec.name], base, exported=exported,
                    task_meta={spec.name: meta} if meta else None)
    return str(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_base):
    """(root, base, task file, {task: TemplateTask}, {method: checkpoint of echo_<method>})."""
    root = tmp_path_factory.mktemp("peft_io")
    task_file = root / "tasks.json"
    task_file.write_text(json.dumps(TASK_FILE), encoding="utf-8")
    for name in ("echo_ptuning", "echo_lora"):
        for split, count, seed in (("train", 8, 1), ("valid", 2, 2), ("test", 3, 3)):
            (root / name).mkdir(exist_ok=True)
            (root / name / f"{split}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in records(name, count, seed)), encoding="utf-8")
    tasks = load_task_file(task_file)
    # the prefix as an epoch checkpoint keeps it (reparameterization MLP and all): export takes either form
    checkpoints = {m: make_checkpoint(tiny_base, tasks[f"echo_{m}"], {m: o}, root / f"ckpt_{m}", seed,
                                      exported=m != "prefix")
                   for seed, (m, o) in enumerate(OPTIONS.items())}
    return root, tiny_base, str(task_file), tasks, checkpoints


def export(checkpoint, out, *extra):
    peft_io.main(["export", str(checkpoint), "--output_dir", str(out), *extra])
    return str(out)


def import_(peft_dir, task, setup, out, *extra):
    peft_io.main(["import", str(peft_dir), "--task", task, "--task_file", setup[2], "--output_dir", str(out),
                  *extra])
    return str(out)


def peft_model(base, folder, rows=None):
    """PEFT's model of a saved adapter over the tiny GPT-2; rows: "resize" (any added rows) or "ours"
    (the added rows ours starts from), for adapters that replace token rows."""
    from peft import PeftModel
    with warnings.catch_warnings():  # PEFT's own warnings
        warnings.simplefilter("ignore")
        gpt2 = GPT2LMHeadModel.from_pretrained(base)
        if rows == "resize":
            gpt2.resize_token_embeddings(VOCAB_SIZE, mean_resizing=False)
        elif rows == "ours":
            add_special_token_rows(gpt2)
        return PeftModel.from_pretrained(gpt2, folder).eval()


def peft_logits(model, ids, **kwargs):
    with warnings.catch_warnings(), torch.no_grad():  # PEFT's calls use deprecated transformers arguments
        warnings.simplefilter("ignore")
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits


IDS = torch.randint(0, GPT2_VOCAB_SIZE, (2, 9), generator=torch.Generator().manual_seed(5))


def our_logits(model, task, ids=IDS, task_id=None):
    """The task's logits on ids, its virtual tokens (if any) in front, as our input builder puts them;
    task_id -1: plain GPT-2 on the same positions (<pad> where the virtual tokens are)."""
    n = model.tasks[task].num_virtual_tokens if task in model.tasks else 0
    batch = len(ids)
    input_ids = torch.cat([torch.full((batch, n), PAD_ID), ids], dim=1)
    virtual = torch.cat([torch.arange(n).expand(batch, n), torch.full(ids.shape, -1)], dim=1)
    with torch.no_grad():
        if task_id == -1:
            return model(input_ids, task_ids=-1).logits
        return model(input_ids, task_ids=model.task_id(task), virtual_ids=virtual).logits


# --- export ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(OPTIONS))
def test_peft_loads_an_export_and_computes_our_logits(method, setup, tmp_path):
    root, base, _, _, checkpoints = setup
    folder = export(checkpoints[method], tmp_path / "peft")
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert config["peft_type"] == PEFT_TYPES[method] and config["base_model_name_or_path"] == base
    ours = load_checkpoint(checkpoints[method])[0]
    task = f"echo_{method}"
    mine = our_logits(ours, task)[..., :GPT2_VOCAB_SIZE]  # a user task never generates the added tokens
    theirs = peft_logits(peft_model(base, folder), IDS)  # PEFT puts its virtual tokens in front too
    assert theirs.shape == mine.shape
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-5)
    plain = our_logits(ours, task, task_id=-1)[..., :GPT2_VOCAB_SIZE]
    assert (mine - plain).abs().max() > 0.05  # the method changes the outputs far beyond the tolerance


def test_a_built_in_tasks_rows_go_along_as_lora_trainable_tokens(setup, tmp_path):
    root, base, _, _, _ = setup
    checkpoint = make_checkpoint(base, TASKS["nlg"], {"lora": {"r": 2, "targets": ["q", "k", "attn_proj"]}},
                                 tmp_path / "nlg", 7)
    folder = export(checkpoint, tmp_path / "peft")
    config = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert config["trainable_token_indices"] == list(builtin_token_ids("nlg"))
    assert config["rank_pattern"] == {"attn.c_attn": 4} and config["alpha_pattern"] == {"attn.c_attn": 64.0}
    ours = load_checkpoint(checkpoint)[0]
    spec = ours.tasks["nlg"].spec()
    ids, types, _ = sample_inputs(spec)  # the task's own tokens as inputs and as segments
    with torch.no_grad():
        mine = ours(ids, token_type_ids=types, task_ids=ours.task_id("nlg")).logits
    columns = comparable_token_ids(spec)  # what the task can generate: GPT-2's tokens and its own
    resized = peft_model(base, folder, rows="resize")
    theirs = peft_logits(resized, ids, token_type_ids=types)
    torch.testing.assert_close(theirs[..., columns], mine[..., columns], rtol=0, atol=1e-5)
    with resized.disable_adapter():  # the rows and the updates matter
        off = peft_logits(resized, ids, token_type_ids=types)
        assert (off[..., columns] - mine[..., columns]).abs().max() > 1
    # over our backbone's other added rows, every column agrees
    torch.testing.assert_close(peft_logits(peft_model(base, folder, rows="ours"), ids, token_type_ids=types),
                               mine, rtol=0, atol=1e-5)


def test_one_task_of_a_combined_model_exports_as_its_own_checkpoint(setup, tmp_path):
    _, _, _, _, checkpoints = setup
    vlm = str(tmp_path / "vlm")
    write_vlm(combine(load_task_checkpoints([checkpoints["lora"], checkpoints["prompt"]])), vlm, log=None)
    for method in ("lora", "prompt"):
        alone = load_file(os.path.join(export(checkpoints[method], tmp_path / method),
                                       "adapter_model.safetensors"))
        picked = load_file(os.path.join(export(vlm, tmp_path / f"vlm_{method}", "--task", f"echo_{method}"),
                                        "adapter_model.safetensors"))
        assert alone.keys() == picked.keys() and all(torch.equal(alone[k], picked[k]) for k in alone)


def refused(capsys, argv):
    """The one stderr line of a refused peft_io.py command (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as stop:
        peft_io.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("case, message", [
    ("adapter", "method adapter has no counterpart in PEFT"),
    ("composed", "method prefix+ln composes methods"),
    ("rows", "its special-token rows need PEFT's trainable_token_indices, which only LoRA has"),
    ("late", "the template must start with <|VIRTUAL_PROMPT_0|>"),
    ("full", "mode 'full'"),
    ("vlm", "holds the tasks echo_lora, echo_prompt; name the one to export with --task"),
])
def test_what_peft_cannot_hold_is_refused_in_one_line(case, message, setup, tmp_path, capsys):
    _, base, _, tasks, checkpoints = setup
    folder = tmp_path / "ckpt"
    if case == "vlm":
        write_vlm(combine(load_task_checkpoints([checkpoints["lora"], checkpoints["prompt"]])), str(folder),
                  log=None)
    else:
        task, methods = {"adapter": (TASKS["mt"], {"adapter": {"bottleneck": 4}}),
                         "composed": (tasks["echo_mixed"], {"prefix": OPTIONS["prefix"], "ln": {}}),
                         "rows": (TASKS["mt"], {"prefix": OPTIONS["prefix"]}),
                         "late": (tasks["late"], {"prompt": {"length": VIRTUAL}}),
                         "full": (TASKS["mt"], {"lora": {}})}[case]
        make_checkpoint(base, task, methods, folder, 3)
        if case == "full":  # a full checkpoint of the same model
            model = load_checkpoint(str(folder))[0]
            shutil.rmtree(folder)
            save_checkpoint(model, load_tokenizer(), str(folder), "full", ["mt"], base)
    err = refused(capsys, ["export", str(folder), "--output_dir", str(tmp_path / "out")])
    assert message in err and "vlm_config.json" in err
    assert not os.path.exists(tmp_path / "out")


def test_a_busy_output_folder_is_refused(setup, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    err = refused(capsys, ["export", setup[4]["lora"], "--output_dir", str(tmp_path / "out")])
    assert "--output_dir" in err and "not empty" in err
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


# --- import ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(OPTIONS))
def test_export_then_import_gives_back_equal_logits(method, setup, tmp_path):
    root, base, _, tasks, checkpoints = setup
    task = f"echo_{method}"
    back = import_(export(checkpoints[method], tmp_path / "peft"), task, setup, tmp_path / "back")
    original, imported = load_checkpoint(checkpoints[method])[0], load_checkpoint(back)[0]
    assert torch.equal(our_logits(imported, task), our_logits(original, task))
    config = json.load(open(os.path.join(back, "vlm_config.json")))
    entry = config["tasks"][task]
    assert entry["template"] == tasks[task].as_json() and entry["token_ids"] == []
    assert config["imported_from"]["peft_type"] == PEFT_TYPES[method]
    # p-tuning: the task file's method (PEFT calls it prompt tuning)
    assert list(entry["methods"]) == [method]
    if method == "lora":  # c_attn's fused block-diagonal update cut back into q and v: tensor for tensor
        assert entry["methods"]["lora"] == original.tasks[task].methods["lora"].options
        saved, before = (load_file(os.path.join(path, "adapters.safetensors"))
                         for path in (back, checkpoints["lora"]))
        assert saved.keys() == before.keys() and all(torch.equal(saved[k], before[k]) for k in saved)


def train_ptuning(setup, out):
    root, base, task_file, _, _ = setup
    argv = ["--task", "echo_ptuning", "--task_file", task_file, "--dataset_path", str(root / "echo_ptuning"),
            "--model_checkpoint", base, "--device", "cpu", "--output_dir", str(out),
            "--train_batch_size", "4", "--gradient_accumulation_steps", "1", "--n_epochs", "1",
            "--lr", "0.01", "--ptuning_hidden", "16"]
    return training.run_training(train.parse_args(argv)).output_dir


def test_a_train_py_checkpoint_exports_and_its_import_decodes_alike_with_evaluate(setup, tmp_path):
    root, base, _, _, _ = setup
    trained = train_ptuning(setup, tmp_path / "trained")
    done = run_script("peft_io.py", "export", trained, "--output_dir", str(tmp_path / "peft"))
    assert done.returncode == 0 and "PROMPT_TUNING" in done.stdout, done.stderr
    ours = load_checkpoint(trained)[0]
    torch.testing.assert_close(peft_logits(peft_model(base, str(tmp_path / "peft")), IDS),
                               our_logits(ours, "echo_ptuning")[..., :GPT2_VOCAB_SIZE], rtol=0, atol=1e-5)
    back = import_(tmp_path / "peft", "echo_ptuning", setup, tmp_path / "back")
    outputs = {}
    for name, checkpoint in (("trained", trained), ("back", back)):
        evaluate.main(["--task", "echo_ptuning", "--model_checkpoint", checkpoint, "--dataset_path",
                       str(root / "echo_ptuning"), "--no_sample", "--device", "cpu", "--max_length", "4",
                       "--output_dir", str(tmp_path / f"eval_{name}")])
        outputs[name] = open(tmp_path / f"eval_{name}" / "echo_ptuning_output.txt", encoding="utf-8").read()
    assert outputs["back"] == outputs["trained"] and len(outputs["trained"].splitlines()) == 3


def test_an_imported_lora_combines_and_decodes_in_a_mixed_batch_as_alone(setup, tmp_path):
    root, _, _, tasks, checkpoints = setup
    imported = import_(export(checkpoints["lora"], tmp_path / "peft"), "echo_lora", setup, tmp_path / "back")
    combine_all.main([imported, checkpoints["prompt"], "--output_dir", str(tmp_path / "vlm")])
    vlm = load_checkpoint(str(tmp_path / "vlm"))[0]
    tokenizer = load_tokenizer()
    options = DecodingOptions(max_length=5, no_sample=True)

    def prompts(model, task):
        return [tasks[task].prompt(template_item(tasks[task], r, "test", tokenizer), model.task_id(task))
                for r in records(task, 3, 9)]
    mixed = prompts(vlm, "echo_lora") + prompts(vlm, "echo_prompt")
    together = generate(vlm, mixed, options, batch_size=len(mixed), progress=False)
    for span, task, single in ((slice(0, 3), "echo_lora", imported), (slice(3, 6), "echo_prompt",
                                                                       checkpoints["prompt"])):
        model = load_checkpoint(single)[0]
        assert together[span] == generate(model, prompts(model, task), options, progress=False), task
    plain = [dataclasses.replace(p, task_id=-1) for p in prompts(vlm, "echo_lora")]
    assert generate(vlm, plain, options, progress=False) != together[:3]  # the imported LoRA decides tokens


def peft_trained(kind, base, folder):
    """An adapter PEFT made itself (random tensors, every one nonzero), saved by its save_pretrained."""
    from peft import LNTuningConfig, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, get_peft_model
    configs = {
        # every slice of c_attn used, a second module of another scale, only layer 1 adapted
        "lora": LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True,
                           alpha_pattern={"mlp.c_proj": 12}, layers_to_transform=[1], lora_dropout=0.05),
        "ptuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL,
                                       encoder_hidden_size=16),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                     encoder_hidden_size=16),
        "ln": LNTuningConfig(target_modules=["ln_2", "ln_f"]),  # ln_1 stays the backbone's
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(base), configs[kind]).eval()
        generator = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn(p.shape, generator=generator))
        model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind", ["lora", "ptuning", "prefix", "ln"])
def test_an_adapter_peft_trained_gives_its_logits_here(kind, setup, tmp_path):
    _, base, _, _, _ = setup
    reference = peft_trained(kind, base, tmp_path / "peft")
    task = f"echo_{kind}"
    ours = load_checkpoint(import_(tmp_path / "peft", task, setup, tmp_path / "back"))[0]
    mine = our_logits(ours, task)[..., :GPT2_VOCAB_SIZE]
    torch.testing.assert_close(mine, peft_logits(reference, IDS), rtol=0, atol=1e-5)
    assert (mine - our_logits(ours, task, task_id=-1)[..., :GPT2_VOCAB_SIZE]).abs().max() > 0.05
    if kind == "lora":
        lora = ours.tasks[task].methods["lora"]
        assert lora.options["targets"] == ["q", "k", "v", "mlp_proj"] and lora.options["r"] == 3
        assert lora.options["dropout"] == 0.05 and not lora.pairs["0_q"].B.any()  # layer 0 not adapted


def edited_copy(folder, out, config=None, tensors=None):
    """A copy of a PEFT folder with settings changed (config: {key: value}) or tensors replaced."""
    shutil.copytree(folder, out)
    path = os.path.join(out, "adapter_config.json")
    settings = dict(json.load(open(path)), **(config or {}))
    json.dump(settings, open(path, "w"))
    if tensors is not None:
        save_file(tensors(load_file(os.path.join(out, "adapter_model.safetensors"))),
                  os.path.join(out, "adapter_model.safetensors"))
    return str(out)


def _pickle_only(folder):
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_model.bin"), "wb") as f:
        f.write(b"never unpickled")


@pytest.mark.parametrize("source, task, change, message", [
    ("lora", "echo_lora", "pickle", "adapter_model.bin: pickled weights are never loaded"),
    ("lora", "echo_lora", {"peft_type": "IA3"}, "adapter_config.json: peft_type 'IA3' has no counterpart"),
    ("lora", "echo_lora", {"use_dora": True}, "adapter_config.json: use_dora True has no counterpart"),
    ("lora", "echo_lora", {"target_modules": ["q_proj"]}, "adapter_config.json: target_modules: 'q_proj'"),
    ("lora", "echo_lora", "lm_head",
     "adapter_model.safetensors: tensor 'base_model.model.lm_head.lora_A.weight' cannot be mapped"),
    ("lora", "echo_lora", "narrow", "adapter_model.safetensors: base_model.model.transformer.h.0.attn.c_attn."
                                    "lora_A.weight has shape (4, 32), expected (4, 64)"),
    ("prefix", "echo_prefix", {"token_dim": 32},
     "adapter_config.json: token_dim is 32, but the backbone's is 64"),
    ("prompt", "late", None, "tasks.json: task 'late': prompt_template"),
    ("prompt", "short", None, "total_virtual_tokens is 3, but the adapter has 4 virtual tokens"),
    ("prompt", "nope", None, "--task nope: not a task of"),
    ("rows", "echo_lora", None, "adapter_config.json: trainable_token_indices: task echo_lora"),
])
def test_bad_adapters_are_one_error_line_naming_file_and_key(source, task, change, message, setup, tmp_path,
                                                              capsys):
    _, base, _, _, checkpoints = setup
    if source == "rows":
        checkpoint = make_checkpoint(base, TASKS["nlg"], {"lora": {}}, tmp_path / "nlg", 2)
        folder = export(checkpoint, tmp_path / "peft")
    else:
        folder = export(checkpoints[source], tmp_path / "exported")
        if change == "pickle":
            folder = edited_copy(folder, tmp_path / "peft")
            _pickle_only(folder)
        elif change == "lm_head":
            folder = edited_copy(folder, tmp_path / "peft", tensors=lambda t: dict(
                t, **{"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}))
        elif change == "narrow":
            folder = edited_copy(folder, tmp_path / "peft", tensors=lambda t: {
                k: v[..., :32].contiguous() if "lora_A" in k else v for k, v in t.items()})
        elif change is not None:
            folder = edited_copy(folder, tmp_path / "peft", config=change)
    err = refused(capsys, ["import", folder, "--task", task, "--task_file", setup[2],
                           "--output_dir", str(tmp_path / "out")])
    assert message in err
    assert not os.path.exists(tmp_path / "out")


def test_command_line_mistakes_are_one_error_line(capsys):
    assert "invalid choice" in refused(capsys, ["merge", "x"])
    assert "--task" in refused(capsys, ["import", "x", "--task_file", "f", "--output_dir", "o"])
