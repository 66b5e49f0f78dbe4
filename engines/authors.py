"""Convert the authors' checkpoints (github.com/zlinao/VGLM, pytorch-transformers 1.2) into ours.

Their train.py and combine_all.py save `model.state_dict()` with torch.save (`pytorch_model.bin`).
Parameter names in their files:
- GPT-2: `transformer.wte.weight` (50,287 rows: GPT-2's 50,257, then `<pad>` and the 29 task tokens
  in the order of their ATTR_TO_SPECIAL_TOKEN, which is our utils.vocab.ALL_SPECIAL_TOKENS),
  `transformer.wpe.weight`, `transformer.h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}.*`
  (Conv1D, Hugging Face's layout and names), `transformer.ln_f.*`, `lm_head.weight` (tied to wte);
  also the causal-mask buffers `transformer.h.N.attn.bias` and `p_gen_linear.*` (a copy head used
  only with their --self_copy), which our model does not need.
- single-task adapter model (modeling_gpt2.Block): `transformer.h.N.adapter_block.{ln,project_down,
  project_up}.{weight,bias}`.
- combined VLM (modeling_vlm.Block + MixAdapter): `transformer.h.N.adapter_block.mixadapter.K.*`,
  where K follows their BOTTLEBECK_MAP / COMMAND2ID order: mt, summarization, dialogue, qa, nlg.
  (Our task ids differ; tasks are mapped by name.)
Their adapter is ours: x + project_up(relu(project_down(ln(x)))) after each block.

Files are read with torch.load(weights_only=True) (never unpickling code) or as safetensors.
Usage: python -m engines.authors FILE --base_model gpt2|FOLDER [--task mt] --output_dir DIR
"""
import math
import os
import pickle
import re
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from engines.specs import builtin_spec
from models.vlm import VersatileLM, backbone_fingerprint, load_backbone
from tasks.table import TASKS, get_task
from utils.errors import ArgumentParser, VLMError, exit_on_user_error
from utils.vocab import ALL_SPECIAL_TOKENS, GPT2_VOCAB_SIZE, VOCAB_SIZE, special_token_id

# Index K of `mixadapter.K` -> task: their COMMAND2ID / ID2COMMAND (combine_all.py, evaluate_vlm.py).
AUTHORS_COMBINED_ORDER = ("mt", "summarization", "dialogue", "qa", "nlg")
_SINGLE = re.compile(r"transformer\.h\.(\d+)\.adapter_block\."
                     r"((?:ln|project_down|project_up)\.(?:weight|bias))$")
_MIXED = re.compile(r"transformer\.h\.(\d+)\.adapter_block\.mixadapter\.(\d+)\."
                    r"((?:ln|project_down|project_up)\.(?:weight|bias))$")
_MASK = re.compile(r"transformer\.h\.(\d+)\.attn\.(bias|masked_bias)$")
SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog, and the cat keeps on sleeping."


# --- reading ---------------------------------------------------------------------------------
def load_authors_state_dict(path):
    """{name: tensor} from a .bin/.pt/.pth (torch.load, weights only) or a .safetensors file."""
    if not os.path.isfile(path):
        raise VLMError(f"{path}: file not found")
    if path.endswith(".safetensors"):
        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise VLMError(f"{path}: corrupted or truncated safetensors file ({error})") from None
    elif path.endswith((".bin", ".pt", ".pth")):
        try:
            # weights_only: only tensors and plain containers are rebuilt; any other pickled
            # object (a class, a function call) stops the load before it runs.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            found = re.search(r"GLOBAL (\S+)", str(error))
            if found:
                raise VLMError(f"{path}: refused: the file pickles {found.group(1)}, not only tensors "
                               f"(only plain state dicts are read; nothing in it was run)") from None
            raise VLMError(f"{path}: not a PyTorch state dict file") from None
        except (RuntimeError, EOFError, ValueError, OSError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise VLMError(f"{path}: not a readable PyTorch state dict ({reason})") from None
    else:
        raise VLMError(f"{path}: expected a .bin, .pt, .pth or .safetensors file")
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                              for k, v in state.items()):
        raise VLMError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    # DistributedDataParallel prefixes every name with "module."; their scripts unwrap it, be tolerant.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


# --- what a state dict holds -----------------------------------------------------------------
@dataclass
class AuthorsLayout:
    kind: str                  # "adapter" (one task), "combined" (their VLM) or "full" (no adapters)
    backbone: dict             # Hugging Face GPT2LMHeadModel names -> tensors (lm_head excluded)
    adapters: dict             # our task name -> {f"{layer}.{param}": tensor}, our adapter method's names
    authors_index: dict        # our task name -> None (adapter_block) or K (mixadapter.K)
    ignored: list = field(default_factory=list)

    @property
    def bottlenecks(self):
        return {t: tensors["0.project_down.weight"].shape[0] for t, tensors in self.adapters.items()}

    def describe(self):
        kinds = {"adapter": "single-task adapter model (transformer.h.N.adapter_block.*)",
                 "combined": "combined VLM (transformer.h.N.adapter_block.mixadapter.K.*)",
                 "full": "GPT-2 without adapters (full fine-tune)"}
        wte = self.backbone["transformer.wte.weight"]
        lines = [f"found: {kinds[self.kind]}; {len(self.backbone)} GPT-2 tensors, "
                 f"vocabulary {wte.shape[0]}, d_model {wte.shape[1]}"]
        for task, bottleneck in self.bottlenecks.items():
            where = ("adapter_block" if self.authors_index[task] is None
                     else f"mixadapter.{self.authors_index[task]}")
            lines.append(f"  task {task}: bottleneck {bottleneck} ({where})")
        if self.ignored:
            kinds_ignored = sorted({re.sub(r"\.h\.\d+\.", ".h.N.", n) for n in self.ignored})
            lines.append(f"  not needed by our model: {len(self.ignored)} tensors "
                         f"({', '.join(kinds_ignored)})")
        return "\n".join(lines)


def inspect_state_dict(state, task=None, where="state dict"):
    """Sort the authors' tensors into backbone, adapters (mapped to our task names) and unneeded ones."""
    backbone, single, mixed, ignored = {}, {}, {}, []
    for name, tensor in state.items():
        if match := _MIXED.match(name):
            layer, index, param = match.groups()
            mixed.setdefault(int(index), {})[f"{layer}.{param}"] = tensor
        elif match := _SINGLE.match(name):
            layer, param = match.groups()
            single[f"{layer}.{param}"] = tensor
        elif _MASK.match(name):
            _check_causal_mask(name, tensor, where)
            ignored.append(name)
        elif name.startswith("p_gen_linear."):
            ignored.append(name)  # their copy head: used only when decoding with --self_copy
        elif name == "lm_head.weight":
            continue  # checked below: tied to wte
        else:
            backbone[name] = tensor
    wte = backbone.get("transformer.wte.weight")
    if wte is None:
        raise VLMError(f"{where}: no transformer.wte.weight; not a GPT-2 state dict of the authors' code")
    if wte.shape[0] != VOCAB_SIZE:
        raise VLMError(f"{where}: transformer.wte.weight has {wte.shape[0]} rows; the authors' models have "
                       f"{VOCAB_SIZE} (GPT-2's {GPT2_VOCAB_SIZE} + {len(ALL_SPECIAL_TOKENS)} special tokens)")
    lm_head = state.get("lm_head.weight")
    if lm_head is not None and not torch.equal(lm_head, wte):
        raise VLMError(f"{where}: lm_head.weight differs from transformer.wte.weight; "
                       f"our model ties them, as the authors' code does")
    if single and mixed:
        raise VLMError(f"{where}: holds both adapter_block.* and adapter_block.mixadapter.* tensors")

    if single:
        if task is None:
            bottleneck = next(v.shape[0] for k, v in single.items() if k.endswith("project_down.weight"))
            fits = [t.name for t in TASKS.values() if t.bottleneck == bottleneck]
            raise VLMError(f"{where}: a single-task adapter model (bottleneck {bottleneck}); its task is "
                           f"not stored in the file: pass --task "
                           f"({' or '.join(fits) or 'one of ' + ', '.join(TASKS)})")
        get_task(task)
        adapters, index = {task: single}, {task: None}
        kind = "adapter"
    elif mixed:
        unknown = sorted(k for k in mixed if k >= len(AUTHORS_COMBINED_ORDER))
        if unknown:
            raise VLMError(f"{where}: mixadapter.{unknown[0]} has no task in the authors' order "
                           f"({', '.join(AUTHORS_COMBINED_ORDER)})")
        adapters = {AUTHORS_COMBINED_ORDER[k]: mixed[k] for k in sorted(mixed)}
        index = {AUTHORS_COMBINED_ORDER[k]: k for k in sorted(mixed)}
        if task is not None:
            get_task(task)
            if task not in adapters:
                raise VLMError(f"{where}: the combined model has no {task} adapter "
                               f"(has {', '.join(adapters)})")
            adapters, index = {task: adapters[task]}, {task: index[task]}
        kind = "combined"
    else:
        if task is not None:
            get_task(task)
        adapters, index, kind = {}, {}, "full"
    for name, tensors in adapters.items():
        _check_adapter(name, tensors, wte.shape[1], where)
    return AuthorsLayout(kind, backbone, adapters, index, sorted(ignored))


def _check_causal_mask(name, tensor, where):
    """Their `attn.bias` is the lower-triangular mask; ours is built in, so it must be exactly that."""
    if name.endswith("masked_bias"):  # a constant (-1e4) in later pytorch-transformers versions
        return
    n = tensor.shape[-1] if tensor.dim() else 0
    causal = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    if tensor.shape != causal.shape or not torch.equal(tensor.to(torch.float32), causal):
        raise VLMError(f"{where}: {name} is not a causal mask; "
                       "cannot convert a model with another attention mask")


def _check_adapter(task, tensors, d_model, where):
    layers = sorted({int(k.split(".")[0]) for k in tensors})
    if layers != list(range(len(layers))):
        raise VLMError(f"{where}: {task} adapters cover blocks {layers}, expected 0..{len(layers) - 1}")
    down = tensors.get("0.project_down.weight")
    if down is None or down.dim() != 2:
        raise VLMError(f"{where}: {task} adapter of block 0 lacks a 2-d project_down.weight")
    bottleneck = down.shape[0]
    shapes = {"ln.weight": (d_model,), "ln.bias": (d_model,), "project_down.weight": (bottleneck, d_model),
              "project_down.bias": (bottleneck,), "project_up.weight": (d_model, bottleneck),
              "project_up.bias": (d_model,)}
    for layer in layers:
        for param, shape in shapes.items():
            tensor = tensors.get(f"{layer}.{param}")
            if tensor is None:
                raise VLMError(f"{where}: {task} adapter of block {layer} lacks {param}")
            if tuple(tensor.shape) != shape:
                raise VLMError(f"{where}: {task} adapter of block {layer}: {param} has shape "
                               f"{tuple(tensor.shape)}, expected {shape} (d_model {d_model}, "
                               f"bottleneck {bottleneck})")


# --- conversion ------------------------------------------------------------------------------
@dataclass
class Conversion:
    model: VersatileLM
    mode: str                  # our checkpoint mode: "adapter" (over base_model) or "full"
    layout: AuthorsLayout
    backbone_note: str         # why that mode: the backbone matched base_model, or where it differs


def convert(state_dict, base_model, task=None, where="state dict"):
    """Our VersatileLM holding the authors' model, plus how it maps (see Conversion).

    The GPT-2 config (heads, epsilon, ...) comes from `base_model`, which the state dict cannot
    tell. Adapter models whose backbone equals base_model's become adapters over that backbone;
    any other backbone (a full fine-tune, or adapters over a different GPT-2) is taken from their
    weights. All 30 special-token rows are always theirs: their training moved every one of them
    (the whole new block of wte was in the optimizer), so they are needed for identical logits."""
    layout = inspect_state_dict(state_dict, task, where)
    gpt2 = load_backbone(base_model)
    ours = gpt2.state_dict()
    for name, tensor in layout.backbone.items():
        if name not in ours:
            raise VLMError(f"{where}: unexpected tensor {name!r} for a GPT-2 model")
        if tuple(ours[name].shape) != tuple(tensor.shape):
            raise VLMError(f"{where}: {name} has shape {tuple(tensor.shape)}, but --base_model {base_model} "
                           f"has {tuple(ours[name].shape)}; pass the GPT-2 size they trained")
    missing = [n for n in ours if n != "lm_head.weight" and n not in layout.backbone]
    if missing:
        raise VLMError(f"{where}: missing GPT-2 tensor {missing[0]}")
    for name, tensors in layout.adapters.items():
        blocks = len({k.split(".")[0] for k in tensors})
        if blocks != gpt2.config.n_layer:
            raise VLMError(f"{where}: {name} adapters for {blocks} blocks; the model has "
                           f"{gpt2.config.n_layer}")

    differs = _first_difference(layout.backbone, ours)
    mode = "adapter" if layout.kind != "full" and differs is None else "full"
    with torch.no_grad():
        if mode == "full":
            for name, tensor in layout.backbone.items():
                ours[name].copy_(tensor)
        else:  # backbone equal: keep base_model's; only the new rows are theirs
            wte = gpt2.get_input_embeddings().weight
            wte[GPT2_VOCAB_SIZE:] = layout.backbone["transformer.wte.weight"][GPT2_VOCAB_SIZE:].to(wte)
    model = VersatileLM(gpt2, [builtin_spec(t, {"adapter": {"bottleneck": b}})
                               for t, b in layout.bottlenecks.items()])
    with torch.no_grad():
        for name, tensors in layout.adapters.items():
            target = model.tasks[name].methods["adapter"].state_dict()
            for key, tensor in tensors.items():
                target[key].copy_(tensor)
    if differs is None:
        note = f"backbone equal to {base_model}"
    else:
        note = f"backbone differs from {base_model} (first at {differs}); GPT-2 weights taken from the file"
    return Conversion(model.eval(), mode, layout, note)


def _first_difference(theirs, ours):
    """Name of the first backbone tensor that differs (wte: the original 50,257 rows only), or None."""
    for name in sorted(theirs):
        a, b = theirs[name], ours[name]
        if name == "transformer.wte.weight":
            a, b = a[:GPT2_VOCAB_SIZE], b[:GPT2_VOCAB_SIZE]
        if not torch.equal(a.to(b.dtype), b):
            return name
    return None


# --- their forward pass, written from their modeling_gpt2.py / modeling_vlm.py -----------------
def authors_logits(state, input_ids, token_type_ids, n_head, eps, adapter=None):
    """Logits (batch, seq, vocab) of the authors' model computed directly from their tensors.

    adapter: None (no adapter; their VLM with task_id=-1), "single" (adapter_block) or K (mixadapter.K).
    Independent of Hugging Face's GPT-2 and of our VersatileLM: it checks the conversion."""
    def p(name):
        return state[name].to(torch.float32)

    def conv1d(x, prefix):  # their Conv1D: x @ W + b with W (in, out)
        return torch.addmm(p(prefix + ".bias"), x.reshape(-1, x.shape[-1]), p(prefix + ".weight")).view(
            *x.shape[:-1], -1)

    def layer_norm(x, prefix):
        return F.layer_norm(x, (x.shape[-1],), p(prefix + ".weight"), p(prefix + ".bias"), eps)

    wte = p("transformer.wte.weight")
    seq = input_ids.shape[-1]
    positions = torch.arange(seq).unsqueeze(0).expand_as(input_ids)
    # Their GPT2Model embeds token_type_ids with the token table wte.
    x = wte[input_ids] + p("transformer.wpe.weight")[positions] + wte[token_type_ids]
    causal = torch.tril(torch.ones(seq, seq)).view(1, 1, seq, seq)
    n_layer = len({int(m.group(1)) for n in state
                   if (m := re.match(r"transformer\.h\.(\d+)\.ln_1\.weight$", n))})
    for layer in range(n_layer):
        h = f"transformer.h.{layer}"
        qkv = conv1d(layer_norm(x, h + ".ln_1"), h + ".attn.c_attn")
        q, k, v = (t.view(*t.shape[:-1], n_head, -1).transpose(1, 2) for t in qkv.split(x.shape[-1], dim=-1))
        w = q @ k.transpose(-1, -2) / math.sqrt(v.shape[-1])
        w = torch.softmax(w * causal - 1e4 * (1 - causal), dim=-1)
        a = (w @ v).transpose(1, 2).reshape(x.shape)
        x = x + conv1d(a, h + ".attn.c_proj")
        m = conv1d(layer_norm(x, h + ".ln_2"), h + ".mlp.c_fc")
        m = 0.5 * m * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * torch.pow(m, 3))))
        x = x + conv1d(m, h + ".mlp.c_proj")
        if adapter is not None:
            a_prefix = f"{h}.adapter_block." + ("" if adapter == "single" else f"mixadapter.{adapter}.")
            down = F.linear(layer_norm(x, a_prefix + "ln"), p(a_prefix + "project_down.weight"),
                            p(a_prefix + "project_down.bias"))
            x = x + F.linear(torch.relu(down), p(a_prefix + "project_up.weight"),
                             p(a_prefix + "project_up.bias"))
    x = layer_norm(x, "transformer.ln_f")
    return x @ wte.t()


def sample_inputs(task, tokenizer):
    """Two rows in a task's layout (bos, source-type token, text, eos): real text and a row of
    random ids that also hits every added token. Returns input_ids, token_type_ids (2, seq)."""
    own = [special_token_id(t) for t in task.special_tokens]
    text = tokenizer.encode(SAMPLE_TEXT)
    length = max(len(text), 2 * len(ALL_SPECIAL_TOKENS))
    text = (text * length)[:length]
    generator = torch.Generator().manual_seed(0)
    noise = list(range(GPT2_VOCAB_SIZE, VOCAB_SIZE))
    noise += torch.randint(0, VOCAB_SIZE, (length - len(noise),), generator=generator).tolist()
    rows = [[own[0]] + body + [own[1]] for body in (text, noise)]
    input_ids = torch.tensor(rows)
    token_type_ids = torch.full_like(input_ids, own[min(2, len(own) - 1)])
    return input_ids, token_type_ids


def logit_differences(conversion, state, tokenizer):
    """{task or "plain": max |our logits - their logits|} on sample inputs."""
    model, layout = conversion.model, conversion.layout
    config = model.gpt2.config
    checks = {t: (TASKS[t], TASKS[t].task_id, "single" if i is None else i)
              for t, i in layout.authors_index.items()}
    if not checks:
        checks = {"plain": (TASKS["dialogue"], -1, None)}
    result = {}
    with torch.no_grad():
        for name, (task, task_id, adapter) in checks.items():
            input_ids, token_type_ids = sample_inputs(task, tokenizer)
            ours = model(input_ids, token_type_ids=token_type_ids,
                         task_ids=torch.full((input_ids.shape[0],), task_id), use_cache=False).logits.float()
            theirs = authors_logits(state, input_ids, token_type_ids, config.n_head,
                                    config.layer_norm_epsilon, adapter)
            result[name] = ((ours - theirs).abs().max().item(), theirs.abs().max().item())
    return result


# --- command line ----------------------------------------------------------------------------
def check_added_tokens(path):
    """If their tokenizer's added_tokens.json lies beside the weights, its ids must be ours."""
    added = os.path.join(os.path.dirname(os.path.abspath(path)), "added_tokens.json")
    if not os.path.isfile(added):
        return None
    from utils.data import read_json_file
    ids, _ = read_json_file(added, "added tokens")
    if not isinstance(ids, dict):
        raise VLMError(f"{added}: expected a mapping of token to id")
    for token in ALL_SPECIAL_TOKENS:
        if ids.get(token) != special_token_id(token):
            raise VLMError(f"{added}: {token} has id {ids.get(token)}, ours is {special_token_id(token)}; "
                           f"the embedding rows would not line up")
    return added


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(description="Convert an authors' (zlinao/VGLM) checkpoint into ours.")
    parser.add_argument("file", help="their pytorch_model.bin (or .pt/.pth/.safetensors with the same names)")
    parser.add_argument("--base_model", required=True,
                        help="GPT-2 they started from: hub name or local folder")
    parser.add_argument("--task", default=None,
                        help="task of a single-task adapter model (or: only this task of the combined VLM)")
    parser.add_argument("--output_dir", required=True, help="folder for our checkpoint")
    args = parser.parse_args(argv)

    from models.checkpoint import save_checkpoint
    from utils.data import load_tokenizer

    state = load_authors_state_dict(args.file)
    added = check_added_tokens(args.file)
    conversion = convert(state, args.base_model, args.task, where=args.file)
    print(conversion.layout.describe())
    if added:
        print(f"  token ids checked against {added}")
    print(f"  {conversion.backbone_note}")
    tokenizer = load_tokenizer(args.base_model)
    worst = 0.0
    for name, (diff, scale) in logit_differences(conversion, state, tokenizer).items():
        print(f"largest |logit difference| ours vs. their forward ({name}): {diff:.3g} "
              f"(logits up to {scale:.3g})")
        worst = max(worst, diff / max(1.0, scale))
    if worst > 1e-4:  # float32 reordering stays orders of magnitude below this
        raise VLMError(f"{args.file}: converted logits differ from the authors' forward; not writing "
                       f"{args.output_dir}")
    layout = conversion.layout
    tasks = list(layout.adapters) or ([args.task] if args.task else [])
    extra = {"converted_from": os.path.abspath(args.file), "authors_layout": layout.kind,
             "authors_adapter_index": {t: i for t, i in layout.authors_index.items()}}
    fingerprint = backbone_fingerprint(conversion.model.gpt2) if conversion.mode == "adapter" else None
    save_checkpoint(conversion.model, tokenizer, args.output_dir, conversion.mode, tasks, args.base_model,
                    base_fingerprint=fingerprint, extra=extra, all_special_rows=True)
    print(f"wrote {conversion.mode} checkpoint ({', '.join(tasks) or 'no task adapters'}) to "
          f"{args.output_dir}")


if __name__ == "__main__":
    sys.exit(main())
