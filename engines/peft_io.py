"""Hugging Face PEFT interop (python peft_io.py): a task checkpoint as a PEFT adapter folder, and
a PEFT adapter folder as a task of a task file. models/peft_map.py maps the tensors; here are the
checkpoints, the tasks and the folders.

export: one task of a checkpoint written by train.py (or a combined VLM, --task naming it) whose
one method is lora, prefix, prompt, ptuning or ln becomes adapter_config.json +
adapter_model.safetensors, which `PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base),
folder)` loads and which computes our logits. What PEFT cannot express is refused:

- methods PEFT lacks (adapter, houlsby, compacter, ...) and compositions (prefix+ln);
- a built-in task's special-token rows with any method but LoRA: only LoRA has
  trainable_token_indices. With LoRA the backbone takes the rows after its embedding is resized
  to 50,287 rows (the added tokens' ids); PEFT's logits then equal ours on every token the task
  can generate (GPT-2's and its own; decoding bans the other added tokens), given the same
  token_type_ids (GPT-2 embeds segments with the same table);
- prompt / p-tuning of a template whose virtual tokens are not all in front: PEFT's prompt
  tuning puts them before the whole input (then positions coincide with ours).

import: the adapter (LORA, PREFIX_TUNING, PROMPT_TUNING, P_TUNING, LN_TUNING; safetensors only,
pickles are never read) over the backbone it names (or --model_checkpoint) becomes a task-module
checkpoint of a task-file task, as `train.py --task_file FILE --task NAME` writes one: the task's
template recorded, the backbone's fingerprint, the method in its saved form. evaluate.py decodes
it, combine_all.py combines it. Prompt tuning and p-tuning import as the task file's method when
it is one of the two (their saved forms are the same table), else as what PEFT says.
"""
import os

import torch
from safetensors.torch import save_file
from transformers import GPT2Config

from engines.settings import check_output_dir
from engines.specs import task_spec
from models.checkpoint import (
    ADAPTER_WEIGHTS,
    ALL_ROWS,
    CONFIG_NAME,
    check_tensor_shapes,
    expected_shapes,
    load_tensors,
    read_config,
    save_checkpoint,
    task_specs,
)
from models.methods import BackboneShape, key_prefix, method_class
from models.peft_map import EXPORT_TYPES, from_peft, to_peft
from models.vlm import VersatileLM, load_backbone
from tasks.task_file import MARKER, load_task_file, recorded_user_tasks
from utils.data import load_tokenizer, read_json_file
from utils.errors import VLMError
from utils.io import atomic_folder, write_json
from utils.vocab import VOCAB_SIZE

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
VIRTUAL_METHODS = ("prompt", "ptuning")  # the same saved form: an (n, d) table of virtual tokens


# --- export --------------------------------------------------------------------------------------
def export_checkpoint(checkpoint, output_dir, task=None):
    """Write one task of `checkpoint` as a PEFT adapter folder; returns a line saying what was written
    and how to load it."""
    check_output_dir(output_dir)
    config, specs = _read_checkpoint(checkpoint)
    where = os.path.join(checkpoint, CONFIG_NAME)
    spec = _pick_task(specs, task, where)
    name = _export_method(spec, where)
    if name in VIRTUAL_METHODS:
        _check_virtual_tokens_in_front(recorded_user_tasks(config, where).get(spec.name), where)
    weights = os.path.join(checkpoint, ADAPTER_WEIGHTS)
    tensors = load_tensors(weights)
    gpt2_config = GPT2Config.from_dict(config["gpt2_config"])
    expected = expected_shapes(specs, gpt2_config)
    check_tensor_shapes({k: v for k, v in tensors.items() if k != ALL_ROWS}, expected, weights,
                        f"not one of the tasks in {CONFIG_NAME}")
    method = method_class(name)(BackboneShape.of(gpt2_config), spec.methods[name])
    prefix = key_prefix(spec.name, name)
    method.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    with torch.no_grad():
        peft_config, peft_tensors = to_peft(name, method.exported(), spec.token_ids,
                                            tensors.get(f"task_embeddings.{spec.name}"))
    peft_config["base_model_name_or_path"] = config["base_model"]
    with atomic_folder(output_dir) as tmp:
        save_file({k: v.detach().contiguous() for k, v in peft_tensors.items()},
                  os.path.join(tmp, PEFT_WEIGHTS), metadata={"format": "pt"})
        write_json(os.path.join(tmp, PEFT_CONFIG), peft_config)
    resize = (f"; resize its token embeddings to {VOCAB_SIZE:,} rows first (the task's own rows "
              f"{spec.token_ids[0]}-{spec.token_ids[-1]} are in the adapter)" if spec.token_ids else "")
    return (f"wrote {output_dir}: task {spec.name}'s {name} as a PEFT {peft_config['peft_type']} adapter; "
            f"load it with PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained"
            f"({config['base_model']!r}), {output_dir!r}){resize}")


def _read_checkpoint(path):
    if not os.path.isdir(path):
        raise VLMError(f"{path}: no such checkpoint folder")
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise VLMError(f"{path}: not a vlm checkpoint (no {CONFIG_NAME})")
    config = read_config(path)
    where = os.path.join(path, CONFIG_NAME)
    if config["mode"] != "adapter":
        raise VLMError(f"{where}: mode {config['mode']!r}: a whole fine-tuned GPT-2 has no per-task method "
                       f"to export (a PEFT adapter holds one task's method over a frozen backbone)")
    for key in ("base_model", "gpt2_config"):
        if not config.get(key):
            raise VLMError(f"{where}: {key!r} is missing")
    return config, task_specs(config, where)


def _pick_task(specs, task, where):
    names = [spec.name for spec in specs]
    if task is None and len(specs) > 1:
        raise VLMError(f"{where}: holds the tasks {', '.join(names)}; name the one to export with --task")
    if task is not None and task not in names:
        raise VLMError(f"--task {task}: {where} holds {', '.join(names)}")
    return specs[0] if task is None else specs[names.index(task)]


def _export_method(spec, where):
    """The one method of a task that PEFT can hold, with the task's rows; else a VLMError saying why."""
    methods = list(spec.methods)
    exportable = ", ".join(EXPORT_TYPES)
    if not methods:
        raise VLMError(f"{where}: task {spec.name} has no method (only its token rows trained); "
                       f"export covers the methods {exportable}")
    if len(methods) > 1:
        raise VLMError(f"{where}: task {spec.name}: method {'+'.join(methods)} composes methods; "
                       f"a PEFT adapter holds one (export covers {exportable})")
    name = methods[0]
    if name not in EXPORT_TYPES:
        raise VLMError(f"{where}: task {spec.name}: method {name} has no counterpart in PEFT "
                       f"(export covers {exportable})")
    if spec.token_ids and name != "lora":
        raise VLMError(f"{where}: task {spec.name}: its special-token rows need PEFT's "
                       f"trainable_token_indices, which only LoRA has; a {EXPORT_TYPES[name]} adapter "
                       f"cannot carry them")
    return name


def _check_virtual_tokens_in_front(task, where, flag=None):
    """A prompt / p-tuning task's virtual tokens must all come before the input, where PEFT puts them."""
    if task is None:
        return
    if task.parts[0] != ("virtual", 0) or len(task.virtual_token_splits) != 1:
        shown = flag or f"{where}: task {task.name}"
        raise VLMError(f"{shown}: prompt_template {task.prompt_template!r}: PEFT's prompt tuning puts every "
                       f"virtual token before the input, so the template must start with {MARKER.format(0)} "
                       f"and have one split")


# --- import --------------------------------------------------------------------------------------
def import_adapter(peft_dir, task_name, task_file, output_dir, model_checkpoint=None):
    """Write the PEFT adapter folder `peft_dir` as a checkpoint of task `task_name` of `task_file`;
    returns a line saying what was written."""
    check_output_dir(output_dir)
    config_path, weights_path = _peft_files(peft_dir)
    config, _ = read_json_file(config_path, "PEFT adapter config")
    if not isinstance(config, dict):
        raise VLMError(f"{config_path}: expected a JSON object of PEFT settings")
    tasks = load_task_file(task_file)
    if task_name not in tasks:
        raise VLMError(f"--task {task_name}: not a task of {task_file} (it has {', '.join(tasks)})")
    task = tasks[task_name]
    base = model_checkpoint or config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise VLMError(f"{config_path}: base_model_name_or_path is empty; "
                       f"name the backbone with --model_checkpoint")
    tensors = load_tensors(weights_path)
    gpt2 = load_backbone(base)
    imported = from_peft(config, tensors, BackboneShape.of(gpt2.config), gpt2, config_path, weights_path)
    if imported.token_rows:
        raise VLMError(f"{config_path}: trainable_token_indices: task {task.name} of {task_file} owns no "
                       f"token rows (task-file tasks use GPT-2's vocabulary only)")
    name, options, state = imported.method, imported.options, imported.state
    if name in VIRTUAL_METHODS:
        name, options, state = _virtual_method(task, imported, task_file)
    options = method_class(name).resolve(options, f"{config_path} ({config['peft_type']} as {name})")
    model = VersatileLM(gpt2, [task_spec(task, {name: options})]).eval()
    model.tasks[task.name].methods[name].load_state_dict(state)
    with atomic_folder(output_dir) as tmp:
        save_checkpoint(model, load_tokenizer(base), tmp, "adapter", [task.name], base,
                        extra={"imported_from": {"peft_dir": os.path.abspath(peft_dir),
                                                 "peft_type": config["peft_type"]}},
                        task_meta={task.name: task.checkpoint_meta()})
    return (f"wrote {output_dir}: task {task.name} with {name} {options} "
            f"from the PEFT {config['peft_type']} adapter")


def _peft_files(peft_dir):
    """(adapter_config.json, adapter_model.safetensors) of a PEFT adapter folder; a folder with only
    the pickled adapter_model.bin is refused (unpickling runs code)."""
    if not os.path.isdir(peft_dir):
        raise VLMError(f"{peft_dir}: no such PEFT adapter folder")
    config_path = os.path.join(peft_dir, PEFT_CONFIG)
    weights_path = os.path.join(peft_dir, PEFT_WEIGHTS)
    if not os.path.isfile(weights_path) and os.path.isfile(os.path.join(peft_dir, PEFT_PICKLE)):
        raise VLMError(f"{os.path.join(peft_dir, PEFT_PICKLE)}: pickled weights are never loaded "
                       f"(unpickling can run code); save the adapter as {PEFT_WEIGHTS} "
                       f"(PEFT's save_pretrained does by default)")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise VLMError(f"{path}: not found "
                           f"(a PEFT adapter folder holds {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    return config_path, weights_path


def _virtual_method(task, imported, task_file):
    """(method, options, state dict) of imported virtual tokens: the task file's prompt or ptuning (the same
    table), else the one PEFT named; the template must hold exactly those tokens, in front."""
    n = imported.options["length"]
    flag = f"{task_file}: task {task.name!r}"
    _check_virtual_tokens_in_front(task, None, flag)
    if task.total_virtual_tokens != n:
        raise VLMError(f"{flag}: total_virtual_tokens is {task.total_virtual_tokens}, but the adapter has "
                       f"{n} virtual tokens (num_virtual_tokens)")
    name = task.method if task.method in VIRTUAL_METHODS else imported.method
    table = next(iter(imported.state.values()))
    if name == "prompt":
        return name, {"length": n}, {"embeddings": table}
    return name, {"length": n, "reparameterize": False}, {"table": table}
