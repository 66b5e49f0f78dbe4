"""evaluate.py as a user runs it: dataset evaluation files and metrics, own input, bad flags."""
import json

import pytest
import torch
from conftest import run_script

from engines.generate import DecodingOptions, generate
from engines.specs import adapter_specs
from models.checkpoint import load_checkpoint, save_checkpoint
from models.vlm import VersatileLM
from tasks.base import decode_text
from tasks.table import TASKS
from utils import e2e_java, metrics

NLG = {"train": [{"src": {"name": "The Vaults", "eatType": "pub"}, "tgt": "The Vaults is a pub."}],
       "test": [{"src": {"name": "The Vaults", "eatType": "pub"}, "tgt": "The Vaults is a pub."},
                {"src": {"name": "The Vaults", "eatType": "pub"}, "tgt": "There is a pub called The Vaults."},
                {"src": {"name": "Alimentum", "area": "city centre", "customer rating": "low"},
                 "tgt": "Alimentum is in the city centre and rated low."}]}
MT = {"train": [{"src": "a dog runs .", "tgt": "ein hund rennt ."}],
      "test": [{"src": "a dog runs .", "tgt": "ein hund rennt ."},
               {"src": "two men are talking .", "tgt": "zwei männer reden ."},
               {"src": "x", "tgt": "y"}]}
QA = {"valid": [{"id": "story1", "document": ["The cat sat on the mat. It was red."], "utterances": [
    {"history": ["What sat?"], "candidates": ["the cat"], "turn_id": 1},
    {"history": ["What sat?", "the cat", "Where?"], "candidates": ["on the mat"], "turn_id": 2}]}]}
DIALOGUE = {"valid": [{"personality": ["i like dogs .", "i am a cook ."], "utterances": [
    {"history": ["hi !"], "candidates": ["bad", "hello , i like dogs ."]},
    {"history": ["hi !", "hello , i like dogs .", "me too !"], "candidates": ["great ."]}]}]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_base, tokenizer):
    """An adapter checkpoint holding one task; adapters perturbed so it differs from the base."""
    def make(task, bottleneck=4):
        path = tmp_path_factory.mktemp(f"ckpt_{task}")
        model = VersatileLM.from_pretrained(tiny_base, adapter_specs({task: bottleneck}))
        with torch.no_grad():
            for p in model.tasks[task].methods["adapter"].parameters():
                p.add_(torch.randn_like(p) * 0.5)
        save_checkpoint(model, tokenizer, str(path), "adapter", [task], tiny_base)
        return str(path)
    return make


def write_dataset(tmp_path, name, content):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    return str(path)


def evaluate(tmp_path, task, checkpoint_path, dataset, *extra):
    result = run_script("evaluate.py", "--task", task, "--no_sample", "--model_checkpoint", checkpoint_path,
                        "--dataset_path", dataset, "--device", "cpu", "--max_length", "12",
                        "--output_dir", str(tmp_path / "out"), "--dataset_cache", str(tmp_path / "cache"),
                        *extra)
    assert result.returncode == 0, result.stderr
    return result


def test_nlg_groups_references_by_mr_and_matches_in_process_decoding(tmp_path, checkpoint, tokenizer):
    ckpt = checkpoint("nlg")
    dataset = write_dataset(tmp_path, "nlg", NLG)
    result = evaluate(tmp_path, "nlg", ckpt, dataset, "--batch_size", "2")
    out = tmp_path / "out"
    outputs = (out / "nlg_output.txt").read_text(encoding="utf-8").splitlines()
    assert len(outputs) == 2  # one output per meaning representation
    assert (out / "nlg_ref.txt").read_text(encoding="utf-8") == (
        "The Vaults is a pub.\nThere is a pub called The Vaults.\n\n"
        "Alimentum is in the city centre and rated low.\n")
    assert (out / "nlg_mr.txt").read_text(encoding="utf-8").splitlines() == [
        "name[The Vaults], eatType[pub]", "name[Alimentum], area[city centre], customer rating[low]"]
    written = json.loads((out / "nlg_metrics.json").read_text())
    # METEOR 1.5 where Java runs (this machine and CI have it), else the approximation METEOR*
    meteor = "METEOR" if e2e_java.available() else "METEOR*"
    assert set(written) == {"task", "examples", "BLEU", "NIST", meteor, "ROUGE_L", "CIDEr"}
    assert "BLEU=" in result.stdout and f"  {meteor}=" in result.stdout
    # The same outputs as decoding in-process, one prompt at a time.
    model, _, _ = load_checkpoint(ckpt)
    records = TASKS["nlg"].load_data(dataset, tokenizer, ["test"])["test"]
    prompts = TASKS["nlg"].dataset_prompts(records, 2, tokenizer, TASKS["nlg"].task_id)
    expected = [decode_text(tokenizer, ids) for ids in
                generate(model, prompts, DecodingOptions(max_length=12, no_sample=True), batch_size=1,
                         progress=False)]
    assert outputs == expected
    # evaluate.py's figures are e2e_scores', the official E2E scorer's (tests/test_score.py)
    scores = metrics.e2e_scores(outputs, [p.meta["references"] for p in prompts])
    assert {name: written[name] for name in scores} == pytest.approx(scores, rel=1e-12)


def test_mt_writes_outputs_references_and_scores_them(tmp_path, checkpoint):
    ckpt = checkpoint("mt")
    evaluate(tmp_path, "mt", ckpt, write_dataset(tmp_path, "mt", MT))
    out = tmp_path / "out"
    outputs = (out / "mt_output.txt").read_text(encoding="utf-8").splitlines()
    references = (out / "mt_ref.txt").read_text(encoding="utf-8").splitlines()
    assert references == ["ein hund rennt.", "zwei männer reden.", "y"]  # the authors' decode clean-up
    assert len(outputs) == 3
    written = json.loads((out / "mt_metrics.json").read_text())
    assert written["bleu"] == pytest.approx(metrics.moses_bleu(outputs, references))
    assert written["sacrebleu"] == pytest.approx(metrics.sacre_bleu(outputs, references))
    assert written["rouge1"] == pytest.approx(metrics.rouge_scores(outputs, references)["rouge1"])


def test_qa_writes_coqa_predictions(tmp_path, checkpoint):
    evaluate(tmp_path, "qa", checkpoint("qa"), write_dataset(tmp_path, "qa", QA))
    predictions = json.loads((tmp_path / "out" / "qa_predictions.json").read_text())
    assert [(p["id"], p["turn_id"]) for p in predictions] == [("story1", 1), ("story1", 2)]
    written = json.loads((tmp_path / "out" / "qa_metrics.json").read_text())
    gold = {("story1", 1): ["the cat"], ("story1", 2): ["on the mat"]}
    assert written["f1"] == pytest.approx(metrics.coqa_scores(predictions, gold)["f1"])


def test_dialogue_reports_bleu_f1_and_perplexity(tmp_path, checkpoint):
    evaluate(tmp_path, "dialogue", checkpoint("dialogue"), write_dataset(tmp_path, "dialogue", DIALOGUE))
    out = tmp_path / "out"
    written = json.loads((out / "dialogue_metrics.json").read_text())
    assert written["ppl"] == pytest.approx(2.718281828 ** written["nll"], rel=1e-6)
    assert written["ppl"] > 1 and "f1" in written and "bleu" in written
    assert (out / "dialogue_persona.txt").read_text().splitlines() == ["i like dogs.\ti am a cook."] * 2


def test_own_input_from_the_command_line_and_stdin(tmp_path, checkpoint):
    ckpt = checkpoint("nlg")
    base = ["evaluate.py", "--task", "nlg", "--no_sample", "--model_checkpoint", ckpt, "--max_length", "8"]
    one = run_script(*base, "--input", "name[The Vaults], eatType[pub]")
    assert one.returncode == 0, one.stderr
    lines = ['{"src": {"name": "The Vaults", "eatType": "pub"}}', '"name[Alimentum], area[city centre]"']
    many = run_script(*base, "--input", "-", stdin="\n".join(lines) + "\n")
    assert many.returncode == 0, many.stderr
    rows = [json.loads(line) for line in many.stdout.splitlines()]
    assert len(rows) == 2 and rows[0]["output"] == one.stdout.rstrip("\n")


@pytest.mark.parametrize("flags, message", [
    (["--task", "poetry"], "--task: unknown task 'poetry'"),
    (["--task", "mt", "--model_checkpoint", "/nonexistent/ckpt"], "--model_checkpoint /nonexistent/ckpt"),
    (["--task", "mt", "--max_length", "0", "--model_checkpoint", "x"], "--max_length must be at least 1"),
    (["--task", "nlg", "--input", "name The Vaults"], "--input: cannot read a meaning representation"),
    (["--task", "nlg", "--top_p", "0", "--input", "x"],
     "--top_p must be in (0, 1] (1 keeps every token), got 0.0"),
    (["--task", "nlg", "--top_p", "1.5", "--input", "x"], "--top_p must be in (0, 1]"),
    (["--task", "nlg", "--top_p", "nan", "--input", "x"], "--top_p must be in (0, 1]"),
])
def test_bad_flags_give_one_line_and_exit_2(flags, message, checkpoint):
    if "--model_checkpoint" not in flags:
        flags = flags + ["--model_checkpoint", checkpoint("nlg")]
    result = run_script("evaluate.py", *flags)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        line for line in result.stderr.splitlines() if line.strip()][-1:]


def test_weights_holding_nan_or_inf_give_one_error_line_in_every_script_that_loads_them(
        checkpoint, tiny_base, tmp_path):
    """Before: evaluate.py sampled from NaN logits and ended in a torch.multinomial traceback."""
    import shutil

    from safetensors.torch import load_file, save_file

    from models.checkpoint import ADAPTER_WEIGHTS
    adapter = tmp_path / "nan_adapter"
    shutil.copytree(checkpoint("nlg"), adapter)
    tensors = load_file(str(adapter / ADAPTER_WEIGHTS))
    name = sorted(k for k in tensors if not k.startswith("task_embeddings."))[0]  # an adapter matrix
    tensors[name].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), 1.0])
    save_file(tensors, str(adapter / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    plain = tmp_path / "nan_gpt2"
    shutil.copytree(tiny_base, plain)
    weights = load_file(str(plain / "model.safetensors"))
    weights["transformer.h.0.attn.c_attn.weight"][0, 0] = float("-inf")
    save_file(weights, str(plain / "model.safetensors"), metadata={"format": "pt"})

    adapter_error = f"error: {adapter / ADAPTER_WEIGHTS}: tensor {name!r} holds 2 NaN or infinite values; " \
                    "the weights are damaged"
    plain_error = (f"error: {plain / 'model.safetensors'}: tensor 'transformer.h.0.attn.c_attn.weight' "
                   "holds 1 NaN or infinite value; the weights are damaged")
    runs = [
        (run_script("evaluate.py", "--task", "nlg", "--model_checkpoint", str(adapter), "--input", "name[A]",
                    "--device", "cpu"), adapter_error),
        (run_script("evaluate.py", "--task", "nlg", "--model_checkpoint", str(plain), "--input", "name[A]",
                    "--device", "cpu"), plain_error),
        (run_script("combine_all.py", str(adapter), "--output_dir", str(tmp_path / "vlm")), adapter_error),
        (run_script("sentence_distiller.py", "--task", "nlg", "--model_checkpoint", str(adapter),
                    "--device", "cpu", "--dataset_path", "data/samples/nlg.json", "--output",
                    str(tmp_path / "d.json")),
         adapter_error),
    ]
    for result, error in runs:
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [error]
