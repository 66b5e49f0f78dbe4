"""Checkpoint folders: tokenizer files, `vlm_config.json` and safetensors weights.

- mode "full": the whole GPT-2 (`model.safetensors` + Hugging Face `config.json`, so the folder
  also loads with GPT2LMHeadModel.from_pretrained).
- mode "adapter": only each task's adapters and its own special-token rows (`adapters.safetensors`,
  a few MB), with the backbone's name and fingerprint; loading rebuilds the full model.
Nothing here unpickles: weights are safetensors, settings JSON.
"""
import os
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from models.vlm import VOCAB_SIZE, VersatileLM, add_special_token_rows, backbone_fingerprint, load_backbone
from utils.data import load_tokenizer, read_json_file
from utils.errors import VLMError
from utils.io import atomic_path, write_json
from utils.tasks import GPT2_VOCAB_SIZE, TASKS, task_token_ids

CONFIG_NAME = "vlm_config.json"
FULL_WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapters.safetensors"
FORMAT_VERSION = 1


def resolve_base_name(name_or_path):
    """Local folders are recorded as absolute paths; hub names as they are."""
    return os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path


def adapter_state_dict(model, tasks, all_special_rows=False):
    """Adapter weights and own special-token rows of `tasks`: the only trained tensors.

    all_special_rows: also store all 30 added rows as `special_token_rows` (converted authors'
    checkpoints: their training moved every added row, not only the task's own)."""
    tensors = {}
    for task in tasks:
        if task in model.adapters:
            for name, tensor in model.adapters[task].state_dict().items():
                tensors[f"adapters.{task}.{name}"] = tensor
        rows = model.gpt2.get_input_embeddings().weight[task_token_ids(TASKS[task])]
        tensors[f"task_embeddings.{task}"] = rows
    if all_special_rows:
        tensors["special_token_rows"] = model.gpt2.get_input_embeddings().weight[GPT2_VOCAB_SIZE:]
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_safetensors(path, tensors, metadata=None):
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def save_tokenizer(tokenizer, output_dir):
    """Tokenizer files written beside the folder, then each renamed into it (never half-written)."""
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tokenizer.") as tmp:
        tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))


def save_checkpoint(model, tokenizer, output_dir, mode, tasks, base_model, base_fingerprint=None,
                    extra=None, weights_name=None, all_special_rows=False):
    """Write a checkpoint folder; every file goes through a temporary name and a rename."""
    os.makedirs(output_dir, exist_ok=True)
    save_tokenizer(tokenizer, output_dir)
    config = {"format": "vlm", "version": FORMAT_VERSION, "mode": mode,
              "tasks": {t: {"bottleneck": model.adapters[t].bottleneck if t in model.adapters else 0,
                            "task_id": TASKS[t].task_id} for t in tasks},
              "vocab_size": VOCAB_SIZE, "gpt2_config": model.gpt2.config.to_dict()}
    if mode == "full":
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.gpt2.state_dict().items()
                 if k != "lm_head.weight"}  # tied to transformer.wte.weight
        save_safetensors(os.path.join(output_dir, weights_name or FULL_WEIGHTS), state, {"format": "pt"})
        write_json(os.path.join(output_dir, "config.json"), model.gpt2.config.to_dict())
        config["base_model"] = base_model
        adapters = {k: v for k, v in adapter_state_dict(model, tasks).items() if k.startswith("adapters.")}
        if adapters:  # a full GPT-2 with adapters (e.g. converted from adapters over another backbone)
            save_safetensors(os.path.join(output_dir, ADAPTER_WEIGHTS), adapters, {"format": "pt"})
    elif mode == "adapter":
        save_safetensors(os.path.join(output_dir, weights_name or ADAPTER_WEIGHTS),
                         adapter_state_dict(model, tasks, all_special_rows), {"format": "pt"})
        config["base_model"] = resolve_base_name(base_model)
        config["base_fingerprint"] = base_fingerprint or backbone_fingerprint(model.gpt2)
    else:
        raise ValueError(f"unknown checkpoint mode {mode!r}")
    config.update(extra or {})
    write_json(os.path.join(output_dir, CONFIG_NAME), config)


def read_config(path):
    config, _ = read_json_file(os.path.join(path, CONFIG_NAME), "checkpoint config")
    if not isinstance(config, dict) or config.get("format") != "vlm" or config.get("mode") not in ("full", "adapter"):
        raise VLMError(f"{os.path.join(path, CONFIG_NAME)}: not a vlm checkpoint config")
    return config


def _load_tensors(path):
    if not os.path.isfile(path):
        raise VLMError(f"{path}: checkpoint weights not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise VLMError(f"{path}: corrupted or truncated safetensors file ({error})") from None


def load_checkpoint(path, device="cpu", base_model=None, weights_name=None):
    """(VersatileLM, tokenizer, config) from a checkpoint folder, a plain GPT-2 folder or hub name."""
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        # Plain GPT-2 (hub name or Hugging Face folder): no adapters, special rows added.
        model = VersatileLM(load_backbone(path))
        return model.to(device).eval(), load_tokenizer(path), {"mode": "plain", "tasks": {}, "base_model": path}
    config = read_config(path)
    tokenizer = load_tokenizer(path)
    if config["mode"] == "full":
        gpt2 = GPT2LMHeadModel(GPT2Config.from_dict(config["gpt2_config"]))
        add_special_token_rows(gpt2)
        state = _load_tensors(os.path.join(path, weights_name or FULL_WEIGHTS))
        missing, unexpected = gpt2.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise VLMError(f"{path}: weights do not match the GPT-2 config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        gpt2.tie_weights()
        model = VersatileLM(gpt2, {t: s["bottleneck"] for t, s in config["tasks"].items() if s["bottleneck"] > 0})
        if model.adapters:
            load_adapter_tensors(model, _load_tensors(os.path.join(path, ADAPTER_WEIGHTS)), path)
    else:
        base = base_model or config["base_model"]
        gpt2 = load_backbone(base)
        fingerprint = backbone_fingerprint(gpt2)
        if fingerprint != config["base_fingerprint"]:
            raise VLMError(f"{path}: adapters were trained on another backbone than {base} "
                           f"(fingerprint {config['base_fingerprint'][:12]}, this one {fingerprint[:12]})")
        model = VersatileLM(gpt2, {t: s["bottleneck"] for t, s in config["tasks"].items() if s["bottleneck"] > 0})
        load_adapter_tensors(model, _load_tensors(os.path.join(path, weights_name or ADAPTER_WEIGHTS)), path)
    return model.to(device).eval(), tokenizer, config


def load_adapter_tensors(model, tensors, where):
    """Copy `adapters.<task>.*` and `task_embeddings.<task>` tensors into the model."""
    wte = model.gpt2.get_input_embeddings().weight
    seen = set()
    with torch.no_grad():
        if "special_token_rows" in tensors:  # all 30 added rows; first, so task_embeddings.* win
            rows = tensors["special_token_rows"]
            if tuple(rows.shape) != (VOCAB_SIZE - GPT2_VOCAB_SIZE, wte.shape[1]):
                raise VLMError(f"{where}: special_token_rows has shape {tuple(rows.shape)}, "
                               f"expected {(VOCAB_SIZE - GPT2_VOCAB_SIZE, wte.shape[1])}")
            wte[GPT2_VOCAB_SIZE:] = rows.to(wte)
            seen.add("special_token_rows")
        for key, tensor in tensors.items():
            if key == "special_token_rows":
                continue
            kind, _, rest = key.partition(".")
            if kind == "task_embeddings" and rest in TASKS:
                rows = task_token_ids(TASKS[rest])
                if tuple(tensor.shape) != (len(rows), wte.shape[1]):
                    raise VLMError(f"{where}: {key} has shape {tuple(tensor.shape)}, "
                                   f"expected {(len(rows), wte.shape[1])}")
                wte[rows] = tensor.to(wte)
            elif kind == "adapters":
                task, _, name = rest.partition(".")
                if task not in model.adapters:
                    raise VLMError(f"{where}: {key} belongs to no adapter of this model")
                target = model.adapters[task].state_dict().get(name)
                if target is None or target.shape != tensor.shape:
                    raise VLMError(f"{where}: {key} does not fit the adapter "
                                   f"(shape {tuple(tensor.shape)})")
                target.copy_(tensor)
            else:
                raise VLMError(f"{where}: unexpected tensor {key!r}; not an adapter checkpoint")
            seen.add(key)
    expected = {f"adapters.{t}.{n}" for t, stack in model.adapters.items() for n in stack.state_dict()}
    missing = sorted(expected - seen)
    if missing:
        raise VLMError(f"{where}: missing adapter tensors, e.g. {missing[0]}")
