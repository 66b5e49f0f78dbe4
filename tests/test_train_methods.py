"""train.py --method NAME: every per-task method trains through the same run, prints its count,
leaves the backbone and all rows but its own bit-identical, saves only its own tensors (exported
form), reloads to identical logits, decodes, and combines with tasks of other methods."""
import json
import math

import pytest
import torch
from conftest import TINY_METHOD_OPTIONS, method_flags, tiny_method_options
from safetensors.torch import load_file

import train
from engines import training
from engines.generate import DecodingOptions, generate, generate_uncached
from models.checkpoint import load_checkpoint
from models.combine import build_model, combine, load_task_checkpoints
from models.methods import METHODS, BackboneShape
from models.vlm import VersatileLM
from tasks.table import TASKS
from utils.data import load_tokenizer
from utils.errors import VLMError
from utils.vocab import GPT2_VOCAB_SIZE

NAMES = ["The Vaults", "The Eagle", "Alimentum", "Zizzi", "Cotto", "Aromi"]


def records(names):
    return [{"src": {"name": n, "eatType": "pub"}, "tgt": f"{n} is a pub."} for n in names]


@pytest.fixture(scope="module")
def nlg_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("nlg") / "nlg.json"
    path.write_text(json.dumps({"train": records(NAMES), "valid": records(NAMES[:2]),
                                "test": records(NAMES[2:4])}),
                    encoding="utf-8")
    return str(path)


def run(tmp_path, data, base, method, *extra, task="nlg", defaults=False, epochs=2):
    """train.py on the tiny model: the method at its small test sizes, or (defaults) --method alone."""
    flags = ["--method", method] if defaults else method_flags(tiny_method_options(method))
    argv = ["--task", task, "--dataset_path", data, "--dataset_cache", str(tmp_path / "cache"),
            "--model_checkpoint", base, "--device", "cpu", "--output_dir", str(tmp_path / method),
            "--train_batch_size", "2", "--valid_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--n_epochs", str(epochs), "--lr", "5e-2", "--eval_before_start", *flags, *extra]
    return training.run_training(train.parse_args(argv))


def test_every_registered_method_has_small_test_sizes():
    assert set(TINY_METHOD_OPTIONS) == set(METHODS)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_saves_only_its_tensors_and_reloads_identically(method, tmp_path, tiny_base, nlg_data,
                                                                      capsys):
    result = run(tmp_path, nlg_data, tiny_base, method)
    out = capsys.readouterr().out
    model = result.model.eval()
    options = model.tasks["nlg"].methods[method].options
    shape = BackboneShape.of(model.config)
    rows = len(TASKS["nlg"].token_ids()) * model.config.n_embd
    # the printed count is the method's formula plus the task's own rows
    assert f"trainable parameters: {METHODS[method].parameter_count(shape, options) + rows:,} (" in out
    assert result.metrics[-1]["val_nll"] < result.metrics[0]["val_nll"] - 0.05  # it learned

    base = VersatileLM.from_pretrained(tiny_base)
    own = set(TASKS["nlg"].token_ids())
    trained = model.gpt2.state_dict()
    for name, tensor in base.gpt2.state_dict().items():
        if name in ("transformer.wte.weight", "lm_head.weight"):
            others = [i for i in range(tensor.shape[0]) if i not in own]
            assert torch.equal(trained[name][others], tensor[others]), name   # GPT-2's and other tasks' rows
            assert not torch.equal(trained[name][sorted(own)], tensor[sorted(own)])
        else:
            assert torch.equal(trained[name], tensor), name                   # the frozen backbone

    saved = load_file(f"{result.output_dir}/adapters.safetensors")
    assert "task_embeddings.nlg" in saved and not any(k.startswith(("gpt2.", "transformer.")) for k in saved)
    assert sum(v.numel() for v in saved.values()) < 0.2 * sum(p.numel() for p in base.parameters())
    config = json.load(open(f"{result.output_dir}/vlm_config.json"))
    assert list(config["tasks"]["nlg"]["methods"]) == [method] and config["base_fingerprint"]

    loaded, tokenizer, _ = load_checkpoint(result.output_dir)
    n = loaded.tasks["nlg"].num_virtual_tokens
    ids = torch.randint(0, GPT2_VOCAB_SIZE, (2, 9))
    types = torch.full_like(ids, sorted(own)[0])
    virtual = torch.cat([torch.arange(n).expand(2, n), torch.full((2, 9), -1)], 1) if n else None
    if n:
        ids = torch.cat([torch.zeros(2, n, dtype=torch.long), ids], 1)
        types = torch.cat([torch.full((2, n), -1), types], 1)
    with torch.no_grad():
        kwargs = {"virtual_ids": virtual} if n else {}
        expected = model(ids, token_type_ids=types, task_ids=TASKS["nlg"].task_id, **kwargs).logits
        got = loaded(ids, token_type_ids=types, task_ids=TASKS["nlg"].task_id, **kwargs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)  # exported prefixes: same values, other sums

    # decoding: batched with the cache gives the authors' uncached tokens, row by row
    test = TASKS["nlg"].load_data(nlg_data, tokenizer, ["test"])["test"]
    prompts = TASKS["nlg"].dataset_prompts(test, 0, tokenizer, loaded.task_id("nlg"))
    options = DecodingOptions(max_length=6, no_sample=True)
    batched = generate(loaded, prompts, options, progress=False)
    assert batched == [generate_uncached(loaded, p, options) for p in prompts]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_with_its_defaults_on_the_tiny_model(method, tmp_path, tiny_base, nlg_data,
                                                                 capsys):
    """--method NAME alone, no option flags: its defaults (the paper's values on GPT-2 small) fit a
    64-wide, 2-layer GPT-2 too, and three steps lower the loss (compacter's d / 32 was once 2, which
    its phm_dim 4 does not divide)."""
    result = run(tmp_path, nlg_data, tiny_base, method, defaults=True, epochs=1)
    model = result.model
    options = model.tasks["nlg"].methods[method].options
    assert options == METHODS[method].resolve({}) or method == "adapter"  # the adapter: the task's bottleneck
    shape = BackboneShape.of(model.config)
    rows = len(TASKS["nlg"].token_ids()) * model.config.n_embd
    assert f"trainable parameters: {METHODS[method].parameter_count(shape, options) + rows:,} (" in \
        capsys.readouterr().out
    assert len(result.step_losses) == 3 and all(math.isfinite(loss) for loss in result.step_losses)
    before, after = (r["val_nll"] for r in result.metrics)
    assert after < before - 0.1  # three steps already lower the validation NLL (by 0.5 or more, measured)


def test_methods_compose_and_resume_after_a_kill_gives_identical_weights(tmp_path, tiny_base, nlg_data):
    whole = run(tmp_path / "a", nlg_data, tiny_base, "prefix+ln")
    assert list(whole.model.tasks["nlg"].methods) == ["prefix", "ln"]
    # a run stopped after epoch 1 (its last checkpoint kept), then resumed: the same final weights
    import shutil
    part = tmp_path / "b" / "prefix+ln"
    shutil.copytree(whole.output_dir, part)
    for name in ("adapters.safetensors", "vlm_config.json"):
        (part / name).unlink()
    shutil.rmtree(part / "checkpoint_epoch2")
    resumed = run(tmp_path / "b", nlg_data, tiny_base, "prefix+ln", "--resume")
    a, b = (load_file(f"{whole.output_dir}/adapters.safetensors"),
            load_file(f"{resumed.output_dir}/adapters.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_tasks_of_different_methods_combine_with_outputs_unchanged(tmp_path, tiny_base, nlg_data):
    mt = tmp_path / "mt.json"
    pairs = [{"src": f"a man {w}", "tgt": f"ein mann {w}"}
             for w in ("sleeps", "runs", "reads", "eats", "sits")]
    mt.write_text(json.dumps({"train": pairs[:4], "test": pairs[4:]}), encoding="utf-8")
    first = run(tmp_path / "1", nlg_data, tiny_base, "lora")
    second = run(tmp_path / "2", str(mt), tiny_base, "ptuning", task="mt")
    sources = load_task_checkpoints([first.output_dir, second.output_dir])
    combined = build_model(combine(sources))
    tokenizer = load_tokenizer()
    options = DecodingOptions(max_length=5, no_sample=True)
    for task, data, single in (("nlg", nlg_data, first.output_dir), ("mt", str(mt), second.output_dir)):
        model = load_checkpoint(single)[0]
        split = "test"
        recs = TASKS[task].load_data(data, tokenizer, [split])[split]
        alone = generate(model, TASKS[task].dataset_prompts(recs, 0, tokenizer, model.task_id(task)),
                         options, progress=False)
        together = generate(combined, TASKS[task].dataset_prompts(recs, 0, tokenizer,
                                                            combined.task_id(task)), options, progress=False)
        assert alone == together, task


def test_option_flags_of_a_method_not_chosen_are_one_error(tmp_path, tiny_base, nlg_data):
    with pytest.raises(VLMError, match="--lora_r is an option of lora, which --method prefix does not use"):
        run(tmp_path, nlg_data, tiny_base, "prefix", "--lora_r", "4")
    with pytest.raises(VLMError, match="unknown method 'lorax'"):
        run(tmp_path, nlg_data, tiny_base, "lorax")


def test_evaluate_names_the_methods_when_a_bottleneck_flag_is_ignored(tmp_path, tiny_base, nlg_data, capsys):
    import evaluate
    result = run(tmp_path, nlg_data, tiny_base, "lora")
    capsys.readouterr()
    evaluate.main(["--task", "nlg", "--model_checkpoint", result.output_dir, "--dataset_path", nlg_data,
                   "--dataset_cache", str(tmp_path / "cache"), "--device", "cpu", "--no_sample",
                   "--max_length", "3", "--adapter_bottleneck", "10",
                   "--output_dir", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert "note: --adapter_bottleneck 10 ignored; in the checkpoint, nlg's modules are lora" in err
    assert (tmp_path / "results" / "nlg_output.txt").is_file()
