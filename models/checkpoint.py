"""Checkpoint folders: tokenizer files, `vlm_config.json` and safetensors weights.

- mode "full": the whole GPT-2 (`model.safetensors` + Hugging Face `config.json`, so the folder
  also loads with GPT2LMHeadModel.from_pretrained).
- mode "adapter" (the historical name of "per-task modules on a frozen backbone"): only each
  task's own tensors (`adapters.safetensors`): its special-token rows (`task_embeddings.<task>`)
  and its methods' tensors (`adapters.<task>.*` for the authors' adapter, `methods.<task>.<method>.*`
  for the others), with the backbone's name and fingerprint; loading rebuilds the full model.
The config describes every task (id, token rows, methods and their options), so a folder loads
without knowing what the tasks are; version 1 folders (adapter bottleneck only) still load.
A pruned tensor (--sparsity, models/sparsity.py) is stored as its kept values and a bit mask, and
recorded in its task's "sparsity" entry; loading restores the exact dense tensor and its mask.
Nothing here unpickles: weights are safetensors, settings JSON.
"""
import os
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from models.methods import BackboneShape, key_prefix, method_class
from models.sparsity import install_masks, masks_of, pack, task_summary, unpack
from models.vlm import (
    TaskSpec,
    VersatileLM,
    add_special_token_rows,
    backbone_fingerprint,
    check_finite,
    load_backbone,
)
from utils.data import load_tokenizer, read_json_file
from utils.errors import VLMError
from utils.io import atomic_path, write_json
from utils.vocab import BUILTIN_TASK_TOKENS, GPT2_VOCAB_SIZE, VOCAB_SIZE, builtin_token_ids

CONFIG_NAME = "vlm_config.json"
FULL_WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapters.safetensors"
FORMAT_VERSION = 2
ALL_ROWS = "special_token_rows"  # optional: all 30 added rows (checkpoints converted from the authors')


def resolve_base_name(name_or_path):
    """Local folders are recorded as absolute paths; hub names as they are."""
    return os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path


# --- what a task is, in a config --------------------------------------------------------------------
def task_config(task, exported=True):
    """The config entry of a TaskModule: id, rows, methods with options (of the saved form)."""
    methods = {name: dict((m.exported() if exported else m).options) for name, m in task.methods.items()}
    entry = {"task_id": task.task_id, "token_ids": list(task.token_ids), "methods": methods,
             "bottleneck": methods.get("adapter", {}).get("bottleneck", 0)}  # read by version-1 tools
    sparsity = task_summary(task)
    if sparsity is not None:
        entry["sparsity"] = sparsity
    return entry


def task_specs(config, where):
    """[TaskSpec] from a config's "tasks" (version 2, or version 1's {"bottleneck", "task_id"})."""
    tasks = config.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise VLMError(f"{where}: 'tasks' must name at least one task")
    specs = []
    for name, entry in tasks.items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("task_id"), int)
                or isinstance(entry["task_id"], bool)):
            raise VLMError(f"{where}: task {name}: 'task_id' must be an integer")
        if "methods" in entry:
            methods, token_ids = entry["methods"], entry.get("token_ids", [])
            if not isinstance(methods, dict) or not all(isinstance(o, dict) for o in methods.values()):
                raise VLMError(f"{where}: task {name}: 'methods' must map method names to option objects")
            if not isinstance(token_ids, list) or not all(isinstance(i, int) for i in token_ids):
                raise VLMError(f"{where}: task {name}: 'token_ids' must be a list of token ids")
            methods = {m: method_class(m, f"{where}: task {name}").resolve(o, f"{where}: task {name}: {m}")
                       for m, o in methods.items()}
        else:  # version 1: the authors' adapter or none, built-in tasks only
            bottleneck = entry.get("bottleneck")
            if not isinstance(bottleneck, int) or isinstance(bottleneck, bool) or bottleneck < 0:
                raise VLMError(f"{where}: task {name}: 'bottleneck' must be a non-negative integer")
            if name not in BUILTIN_TASK_TOKENS:
                raise VLMError(f"{where}: unknown task {name!r}")
            methods = {"adapter": {"bottleneck": bottleneck}} if bottleneck > 0 else {}
            token_ids = list(builtin_token_ids(name))
        specs.append(TaskSpec(name, entry["task_id"], tuple(token_ids), methods))
    return specs


def expected_shapes(specs, gpt2_config):
    """{tensor name: shape} an adapter checkpoint of these tasks holds (built on the meta device)."""
    shape = BackboneShape.of(gpt2_config)
    expected = {}
    for spec in specs:
        if spec.token_ids:
            expected[f"task_embeddings.{spec.name}"] = (len(spec.token_ids), gpt2_config.n_embd)
        for name, options in spec.methods.items():
            with torch.device("meta"):
                module = method_class(name)(shape, options)
            expected.update({key_prefix(spec.name, name) + k: tuple(v.shape)
                             for k, v in module.state_dict().items()})
    return expected


# --- saving ---------------------------------------------------------------------------------------
def task_state_dict(model, tasks, all_special_rows=False, exported=True):
    """The tasks' own tensors: special-token rows and method tensors (in their saved form)."""
    wte = model.gpt2.get_input_embeddings().weight
    tensors = {}
    for name in tasks:
        task = model.tasks[name]
        if task.token_ids:
            tensors[f"task_embeddings.{name}"] = wte[list(task.token_ids)]
        for method_name, method in task.methods.items():
            masks = masks_of(method)  # pruned tensors keep their names in the exported form
            saved = method.exported() if exported else method
            for k, v in saved.state_dict().items():
                key = key_prefix(name, method_name) + k
                if k in masks:
                    tensors.update(pack(key, v, masks[k]))
                else:
                    tensors[key] = v
    if all_special_rows:
        tensors[ALL_ROWS] = wte[GPT2_VOCAB_SIZE:]
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _untracked_task(name):
    """The entry of a task a full model was fine-tuned on without modules of its own: its rows
    are part of the full table and it decodes as plain GPT-2 (task id -1)."""
    return {"task_id": -1, "token_ids": list(builtin_token_ids(name)), "methods": {}, "bottleneck": 0}


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
                    extra=None, weights_name=None, all_special_rows=False, exported=True, task_meta=None):
    """Write a checkpoint folder; every file goes through a temporary name and a rename.

    exported=False keeps methods in their training form (epoch checkpoints, which --resume reads);
    task_meta: {task: extra config entries} (the engines record a user task's template there)."""
    os.makedirs(output_dir, exist_ok=True)
    save_tokenizer(tokenizer, output_dir)
    tasks = list(tasks)
    config = {"format": "vlm", "version": FORMAT_VERSION, "mode": mode,
              "tasks": {t: dict(task_config(model.tasks[t], exported) if t in model.tasks
                                else _untracked_task(t),
                                **(task_meta or {}).get(t, {})) for t in tasks},
              "vocab_size": VOCAB_SIZE, "gpt2_config": model.gpt2.config.to_dict()}
    module_tensors = task_state_dict(model, [t for t in tasks if t in model.tasks], all_special_rows,
                                     exported)
    if mode == "full":
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.gpt2.state_dict().items()
                 if k != "lm_head.weight"}  # tied to transformer.wte.weight
        save_safetensors(os.path.join(output_dir, weights_name or FULL_WEIGHTS), state, {"format": "pt"})
        write_json(os.path.join(output_dir, "config.json"), model.gpt2.config.to_dict())
        config["base_model"] = base_model
        methods = {k: v for k, v in module_tensors.items() if not k.startswith("task_embeddings.")}
        if methods:  # a full GPT-2 with task modules (e.g. converted from adapters over another backbone)
            save_safetensors(os.path.join(output_dir, ADAPTER_WEIGHTS), methods, {"format": "pt"})
    elif mode == "adapter":
        save_safetensors(os.path.join(output_dir, weights_name or ADAPTER_WEIGHTS), module_tensors,
                         {"format": "pt"})
        config["base_model"] = resolve_base_name(base_model)
        config["base_fingerprint"] = base_fingerprint or backbone_fingerprint(model.gpt2)
    else:
        raise ValueError(f"unknown checkpoint mode {mode!r}")
    config.update(extra or {})
    write_json(os.path.join(output_dir, CONFIG_NAME), config)


# --- loading --------------------------------------------------------------------------------------
def read_config(path):
    config, _ = read_json_file(os.path.join(path, CONFIG_NAME), "checkpoint config")
    if (not isinstance(config, dict) or config.get("format") != "vlm"
            or config.get("mode") not in ("full", "adapter")):
        raise VLMError(f"{os.path.join(path, CONFIG_NAME)}: not a vlm checkpoint config")
    return config


def load_tensors(path):
    """A safetensors file's tensors, pruned ones restored to their exact dense form."""
    return load_sparse_tensors(path)[0]


def load_sparse_tensors(path):
    """(dense tensors, {key: pruning mask}) of a safetensors file (models/sparsity.py unpack)."""
    if not os.path.isfile(path):
        raise VLMError(f"{path}: checkpoint weights not found")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise VLMError(f"{path}: corrupted or truncated safetensors file ({error})") from None
    check_finite(tensors, path)
    return unpack(tensors, path)


_load_tensors = load_tensors  # the name other modules imported before


def load_checkpoint(path, device="cpu", base_model=None, weights_name=None):
    """(VersatileLM, tokenizer, config) from a checkpoint folder, a plain GPT-2 folder or hub name."""
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        # Plain GPT-2 (hub name or Hugging Face folder): no tasks, special rows added.
        model = VersatileLM(load_backbone(path))
        return (model.to(device).eval(), load_tokenizer(path),
                {"mode": "plain", "tasks": {}, "base_model": path})
    config = read_config(path)
    where = os.path.join(path, CONFIG_NAME)
    tokenizer = load_tokenizer(path)
    specs = task_specs(config, where) if config["mode"] == "adapter" or config.get("tasks") else []
    if config["mode"] == "full":
        gpt2 = GPT2LMHeadModel(GPT2Config.from_dict(config["gpt2_config"]))
        add_special_token_rows(gpt2)
        specs = [s for s in specs if s.methods]  # a full model's own rows are in its table already
    else:
        gpt2 = load_backbone(base_model or config["base_model"])
    model = VersatileLM(gpt2, specs)
    load_weights(model, path, config, weights_name, base_model or config.get("base_model"))
    return model.to(device).eval(), tokenizer, config


def load_weights(model, path, config=None, weights_name=None, base_name="--model_checkpoint"):
    """Copy a checkpoint folder's weights into a model built for it: the whole GPT-2 of a full
    checkpoint (and its tasks' method tensors), or the task modules of an adapter checkpoint,
    whose backbone must be the one they were trained on (`base_name` names it in the error).
    Epoch checkpoints keep methods in their training form, so they load into the model being
    trained as they are (--resume)."""
    config = config or read_config(path)
    if config["mode"] == "full":
        state = load_tensors(os.path.join(path, weights_name or FULL_WEIGHTS))
        missing, unexpected = model.gpt2.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the input embeddings
        if missing or unexpected:
            raise VLMError(f"{path}: weights do not match the GPT-2 config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.gpt2.tie_weights()
        if any(t.methods for t in model.tasks.values()):
            weights = os.path.join(path, ADAPTER_WEIGHTS)
            tensors, masks = load_sparse_tensors(weights)
            load_task_tensors(model, tensors, path, rows=False)
            install_masks(model, masks, weights)
        return
    fingerprint = backbone_fingerprint(model.gpt2)
    if fingerprint != config.get("base_fingerprint"):
        raise VLMError(f"{path}: task modules were trained on another backbone than {base_name} "
                       f"(fingerprint {str(config.get('base_fingerprint'))[:12]}, "
                       f"this one {fingerprint[:12]})")
    weights = os.path.join(path, weights_name or ADAPTER_WEIGHTS)
    tensors, masks = load_sparse_tensors(weights)
    load_task_tensors(model, tensors, path)
    install_masks(model, masks, weights)  # pruned tensors stay pruned (--resume)


def check_tensor_shapes(tensors, expected, where, unexpected_why):
    """Every expected tensor there with its shape, and none besides (`unexpected_why` says why
    an extra one does not belong)."""
    for key in tensors:
        if key not in expected:
            raise VLMError(f"{where}: unexpected tensor {key!r} ({unexpected_why})")
    for key, shape in expected.items():
        if key not in tensors:
            raise VLMError(f"{where}: missing tensor {key!r}")
        if tuple(tensors[key].shape) != shape:
            raise VLMError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")


def load_task_tensors(model, tensors, where, rows=True):
    """Copy `task_embeddings.<task>`, method tensors (and optionally all 30 `special_token_rows`)
    into the model; every tensor must fit, and every expected one be there."""
    wte = model.gpt2.get_input_embeddings().weight
    expected = expected_shapes([t.spec() for t in model.tasks.values()], model.gpt2.config)
    if not rows:
        expected = {k: v for k, v in expected.items() if not k.startswith("task_embeddings.")}
    with torch.no_grad():
        if ALL_ROWS in tensors:  # all 30 added rows; first, so task_embeddings.* win
            rows_tensor = tensors[ALL_ROWS]
            if tuple(rows_tensor.shape) != (VOCAB_SIZE - GPT2_VOCAB_SIZE, wte.shape[1]):
                raise VLMError(f"{where}: {ALL_ROWS} has shape {tuple(rows_tensor.shape)}, "
                               f"expected {(VOCAB_SIZE - GPT2_VOCAB_SIZE, wte.shape[1])}")
            wte[GPT2_VOCAB_SIZE:] = rows_tensor.to(wte)
        check_tensor_shapes({k: v for k, v in tensors.items() if k != ALL_ROWS}, expected, where,
                            "not a tensor of this checkpoint's tasks")
        for task in model.tasks.values():
            key = f"task_embeddings.{task.name}"
            if key in expected:
                wte[list(task.token_ids)] = tensors[key].to(wte)
            load_method_tensors(task, tensors)


def load_method_tensors(task, tensors):
    """Copy a TaskModule's method tensors (`methods.<task>.<method>.*`, the adapter's `adapters.<task>.*`)
    from a checkpoint's tensors, whose shapes have been checked."""
    for method_name, method in task.methods.items():
        prefix = key_prefix(task.name, method_name)
        method.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
