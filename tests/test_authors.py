"""Converting the authors' (zlinao/VGLM) checkpoints: state dicts with their parameter names are
built here from a tiny random GPT-2, and every converted model must give the logits of an
independent reference of their model (Hugging Face's GPT-2 loaded with their tensors, their adapter
applied by forward hooks), bit for bit."""
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from engines.authors import authors_logits, convert, load_authors_state_dict
from models.checkpoint import load_checkpoint
from tasks.table import TASKS
from tests.conftest import TINY_CONFIG, run_script, tiny_gpt2
from utils.errors import VLMError
from utils.vocab import GPT2_VOCAB_SIZE

VOCAB = GPT2_VOCAB_SIZE + 30
D_MODEL, N_LAYER, N_CTX = TINY_CONFIG["n_embd"], TINY_CONFIG["n_layer"], TINY_CONFIG["n_positions"]
# Their combined model's adapter order, mixadapter.K -> task: COMMAND2ID in their combine_all.py
# and evaluate_vlm.py ({"mt": 0, "summarization": 1, "dialogue": 2, "qa": 3, "nlg": 4}).
THEIR_ORDER = ("mt", "summarization", "dialogue", "qa", "nlg")
# Distinct bottlenecks per task, so a wrong mixadapter index -> task mapping cannot go unnoticed.
COMBINED_BOTTLENECKS = {"mt": 6, "summarization": 3, "dialogue": 4, "qa": 5, "nlg": 2}


def authors_state(seed=0, rows_seed=7):
    """GPT-2 tensors named as in their pytorch_model.bin: 50,287-row wte (their own new rows),
    tied lm_head, causal-mask buffers `attn.bias` and their unused copy head `p_gen_linear`."""
    gpt2 = tiny_gpt2(seed)
    gpt2.resize_token_embeddings(VOCAB, mean_resizing=False)
    state = {k: v.detach().clone() for k, v in gpt2.state_dict().items() if k != "lm_head.weight"}
    generator = torch.Generator().manual_seed(rows_seed)
    state["transformer.wte.weight"][GPT2_VOCAB_SIZE:] = torch.randn(30, D_MODEL, generator=generator) * 0.3
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied: one storage, as torch.save keeps it
    for layer in range(N_LAYER):
        state[f"transformer.h.{layer}.attn.bias"] = torch.tril(torch.ones(N_CTX, N_CTX)).view(
            1, 1, N_CTX, N_CTX)
    state["p_gen_linear.weight"] = torch.randn(1, D_MODEL, generator=generator)
    state["p_gen_linear.bias"] = torch.randn(1, generator=generator)
    return state


def add_adapter(state, prefix, bottleneck, seed):
    """Random values (LayerNorm included) for `transformer.h.N.adapter_block.<prefix>*`."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"ln.weight": (D_MODEL,), "ln.bias": (D_MODEL,), "project_down.weight": (bottleneck, D_MODEL),
              "project_down.bias": (bottleneck,), "project_up.weight": (D_MODEL, bottleneck),
              "project_up.bias": (D_MODEL,)}
    for layer in range(N_LAYER):
        for name, shape in shapes.items():
            value = torch.randn(*shape, generator=generator) * 0.2
            if name == "ln.weight":
                value += 1
            state[f"transformer.h.{layer}.adapter_block.{prefix}{name}"] = value
    return state


def reference_logits(state, input_ids, token_type_ids, adapter_prefix=None):
    """Their model, computed without models/: Hugging Face's GPT-2 (same names and Conv1D layout,
    token_type_ids embedded with wte as their GPT2Model does) loaded with their tensors, and after
    every block their Adapter, x + project_up(relu(project_down(ln(x)))), applied by a hook."""
    config = GPT2Config(**TINY_CONFIG, vocab_size=VOCAB)
    gpt2 = GPT2LMHeadModel(config).eval()
    gpt2.load_state_dict({k: v for k, v in state.items() if not k.endswith(".attn.bias")
                          and ".adapter_block." not in k and not k.startswith("p_gen_linear.")})

    def hook_for(layer):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output

            def p(name):
                return state[f"transformer.h.{layer}.adapter_block.{adapter_prefix}{name}"]

            x = F.layer_norm(hidden, (D_MODEL,), p("ln.weight"), p("ln.bias"), config.layer_norm_epsilon)
            x = F.linear(torch.relu(F.linear(x, p("project_down.weight"), p("project_down.bias"))),
                         p("project_up.weight"), p("project_up.bias"))
            out = hidden + x
            return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out
        return hook

    if adapter_prefix is not None:
        for layer, block in enumerate(gpt2.transformer.h):
            block.register_forward_hook(hook_for(layer))
    with torch.no_grad():
        return gpt2(input_ids=input_ids, token_type_ids=token_type_ids).logits


def sample_batch(task, seed=0):
    """Two rows: random text ids around the task's bos/eos, one of them holding all 30 added ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, GPT2_VOCAB_SIZE, (2, 40), generator=generator)
    ids[1, 5:35] = torch.arange(GPT2_VOCAB_SIZE, VOCAB)
    bos, eos, source = task.token_ids()[:3]
    ids[:, 0], ids[:, -1] = bos, eos
    return ids, torch.full_like(ids, source)


def our_logits(model, input_ids, token_type_ids, task_id):
    with torch.no_grad():
        return model(input_ids, token_type_ids=token_type_ids,
                     task_ids=torch.full((input_ids.shape[0],), task_id)).logits


def test_single_task_adapter_conversion(tiny_base):
    state = add_adapter(authors_state(), "", bottleneck=7, seed=1)
    conversion = convert(state, tiny_base, task="mt")
    assert conversion.mode == "adapter"  # their backbone is the base's: only adapters + rows are new
    assert conversion.layout.kind == "adapter" and conversion.layout.bottlenecks == {"mt": 7}
    model = conversion.model
    assert torch.equal(model.gpt2.get_input_embeddings().weight, state["transformer.wte.weight"])
    ids, types = sample_batch(TASKS["mt"])
    expected = reference_logits(state, ids, types, adapter_prefix="")
    assert torch.equal(our_logits(model, ids, types, TASKS["mt"].task_id), expected)
    # The reference written from their source in engines/authors.py (used by the CLI) agrees up to
    # float32 reordering (its attention is not Hugging Face's kernel).
    theirs = authors_logits(state, ids, types, TINY_CONFIG["n_head"], 1e-5, adapter="single")
    assert (theirs - expected).abs().max().item() <= 1e-5
    with pytest.raises(VLMError, match="--task"):  # the task is not in the file
        convert(state, tiny_base)


def test_combined_vlm_conversion(tiny_base):
    state = authors_state()
    for index, task in enumerate(THEIR_ORDER):  # their mixadapter order
        add_adapter(state, f"mixadapter.{index}.", COMBINED_BOTTLENECKS[task], seed=10 + index)
    conversion = convert(state, tiny_base)
    assert conversion.mode == "adapter" and conversion.layout.kind == "combined"
    assert conversion.layout.bottlenecks == COMBINED_BOTTLENECKS
    for index, task in enumerate(THEIR_ORDER):
        ids, types = sample_batch(TASKS[task], seed=index)
        expected = reference_logits(state, ids, types, adapter_prefix=f"mixadapter.{index}.")
        assert torch.equal(our_logits(conversion.model, ids, types, TASKS[task].task_id), expected), task
    # Their VLM with task_id=-1 is plain GPT-2 with their rows; ours with -1 is the same.
    ids, types = sample_batch(TASKS["qa"])
    assert torch.equal(our_logits(conversion.model, ids, types, -1), reference_logits(state, ids, types))


def test_full_finetune_conversion(tiny_base, tmp_path, tokenizer):
    from models.checkpoint import save_checkpoint
    state = authors_state(seed=3)  # another GPT-2 than the base: fully fine-tuned weights
    conversion = convert(state, tiny_base)
    assert conversion.mode == "full" and conversion.layout.kind == "full" and not conversion.model.tasks
    ids, types = sample_batch(TASKS["nlg"])
    assert torch.equal(our_logits(conversion.model, ids, types, -1), reference_logits(state, ids, types))

    # Adapters over a backbone that is not the base's: the GPT-2 comes from the file, the adapter
    # stays, and a full checkpoint keeps both.
    add_adapter(state, "", bottleneck=5, seed=4)
    conversion = convert(state, tiny_base, task="nlg")
    assert conversion.mode == "full" and conversion.layout.bottlenecks == {"nlg": 5}
    expected = reference_logits(state, ids, types, adapter_prefix="")
    assert torch.equal(our_logits(conversion.model, ids, types, TASKS["nlg"].task_id), expected)
    save_checkpoint(conversion.model, tokenizer, str(tmp_path), "full", ["nlg"], tiny_base)
    loaded, _, config = load_checkpoint(str(tmp_path))
    assert config["mode"] == "full" and ({t: m.methods["adapter"].bottleneck for t, m in loaded.tasks.items()}
                                         == {"nlg": 5})
    assert torch.equal(our_logits(loaded, ids, types, TASKS["nlg"].task_id), expected)


class Planted:
    """Unpickling this would run open(marker, "w"), i.e. create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("zipfile_format", [True, False])
def test_malicious_pickle_refused(tmp_path, tiny_base, zipfile_format):
    marker = tmp_path / "marker"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "x": Planted(str(marker))}, path,
               _use_new_zipfile_serialization=zipfile_format)
    with pytest.raises(VLMError, match="refused"):
        load_authors_state_dict(str(path))
    assert not marker.exists()
    if zipfile_format:  # the script: one line on stderr, exit 2, nothing written
        result = run_script("-m", "engines.authors", str(path), "--base_model", tiny_base,
                            "--output_dir", str(tmp_path / "out"))
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {path}: refused")
        assert not marker.exists() and not (tmp_path / "out").exists()


def test_reading_other_files(tmp_path):
    state = authors_state()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, str(path))
    loaded = load_authors_state_dict(str(path))
    assert set(loaded) == set(state) - {"lm_head.weight"}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    (tmp_path / "broken.bin").write_bytes(b"not a torch file")
    (tmp_path / "weights.npz").write_bytes(b"")
    for name, message in (("broken.bin", "not a"), ("weights.npz", "expected a .bin"),
                          ("absent.bin", "not found")):
        with pytest.raises(VLMError, match=message):
            load_authors_state_dict(str(tmp_path / name))
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(VLMError, match="not a state dict"):
        load_authors_state_dict(str(tmp_path / "list.pt"))


def test_refuses_what_it_cannot_convert(tiny_base):
    def broken(change):
        state = authors_state()
        change(state)
        return state

    cases = {
        "rows": broken(lambda s: s.update({"transformer.wte.weight":
                                           s["transformer.wte.weight"][:GPT2_VOCAB_SIZE]})),
        "not a causal mask": broken(lambda s: s["transformer.h.1.attn.bias"].fill_(1)),
        "lm_head.weight differs": broken(lambda s: s.update({"lm_head.weight": torch.zeros(VOCAB, D_MODEL)})),
        "unexpected tensor": broken(lambda s: s.update({"transformer.extra.weight": torch.zeros(1)})),
        "lacks project_up.bias": add_adapter(authors_state(), "", 3, seed=0),
    }
    del cases["lacks project_up.bias"]["transformer.h.1.adapter_block.project_up.bias"]
    cases["project_up.weight has shape"] = add_adapter(authors_state(), "", 3, seed=0)
    cases["project_up.weight has shape"]["transformer.h.1.adapter_block.project_up.weight"] = torch.zeros(
        D_MODEL, 4)
    for message, state in cases.items():
        with pytest.raises(VLMError, match=message):
            convert(state, tiny_base, task="qa")


def test_cli_writes_loadable_checkpoint(tmp_path, tiny_base):
    state = add_adapter(authors_state(), "", bottleneck=7, seed=1)
    path = tmp_path / "run" / "pytorch_model.bin"
    path.parent.mkdir()
    torch.save(state, path)
    out = tmp_path / "converted"
    result = run_script("-m", "engines.authors", str(path), "--base_model", tiny_base, "--task", "mt",
                        "--output_dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "single-task adapter model" in result.stdout and "task mt: bottleneck 7" in result.stdout
    assert "largest |logit difference| ours vs. their forward (mt)" in result.stdout
    assert os.path.isfile(out / "adapters.safetensors")
    model, _, config = load_checkpoint(str(out))
    assert config["mode"] == "adapter" and config["authors_layout"] == "adapter"
    ids, types = sample_batch(TASKS["mt"], seed=5)
    expected = reference_logits(state, ids, types, adapter_prefix="")
    assert torch.equal(our_logits(model, ids, types, TASKS["mt"].task_id), expected)
