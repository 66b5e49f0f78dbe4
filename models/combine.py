"""One model for every task: combine per-task checkpoints into one Versatile Language Model.

Task checkpoints trained over one backbone hold disjoint tensors: each task's method tensors
(`adapters.<task>.*`, `methods.<task>.<method>.*`, whatever its methods) and `task_embeddings.<task>`
(the task's own special-token rows; training leaves every other added row at its fixed-seed init).
Combining is therefore a union of tensor dicts, with no arithmetic on weights, and the combined
model computes each task's outputs with the very same rows and operations as the task's own
checkpoint. verify() checks that bit for bit on sample inputs before anything is written.

    checkpoints = load_task_checkpoints(paths)
    combined = combine(checkpoints, base_vlm=None, remove=(), replace=False)
    manifest = write_vlm(combined, output_dir)      # builds, saves to a temp folder, verifies, renames
    print(size_report(manifest))
"""
import os
import zlib
from dataclasses import dataclass, field

import torch
from transformers import GPT2Config

from models.checkpoint import (
    ADAPTER_WEIGHTS,
    ALL_ROWS,
    CONFIG_NAME,
    check_tensor_shapes,
    expected_shapes,
    load_checkpoint,
    load_sparse_tensors,
    load_task_tensors,
    read_config,
    resolve_base_name,
    save_checkpoint,
    task_specs,
)
from models.methods import key_prefix, method_class
from models.sparsity import install_masks, task_summary
from models.vlm import TaskSpec, VersatileLM, backbone_fingerprint, load_backbone
from utils.data import load_tokenizer, read_json_file
from utils.errors import VLMError
from utils.io import atomic_folder, write_json
from utils.vocab import GPT2_VOCAB_SIZE, PAD_ID, SPECIAL_IDS, VOCAB_SIZE

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "vlm-manifest"
# Files a combined VLM folder may hold; an in-place update replaces the folder as a whole, so it
# refuses a folder with anything else in it (say a train.py output with checkpoint_epoch* folders).
VLM_FILES = {CONFIG_NAME, ADAPTER_WEIGHTS, MANIFEST_NAME, "tokenizer.json", "tokenizer_config.json",
             "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
             "chat_template.jinja"}
# What a task entry of a config says about the model; other entries (a user task's "template") are
# the engines' and travel with the task unchanged.
TASK_ENTRY_KEYS = ("task_id", "token_ids", "methods", "bottleneck", "sparsity")
# Sample inputs of verify(): a few random sequences per task, the same in every run.
SAMPLE_SEED, SAMPLE_ROWS, SAMPLE_LENGTH = 1234, 3, 16


@dataclass
class TaskCheckpoint:
    """An adapter checkpoint folder as read from disk: its vlm_config.json and its tensors."""
    path: str
    config: dict
    tensors: dict  # name -> tensor, as stored in adapters.safetensors (pruned ones made dense again)
    masks: dict = field(default_factory=dict)  # name -> pruning mask of a pruned tensor

    @property
    def tasks(self):
        return list(self.config["tasks"])

    @property
    def fingerprint(self):
        return self.config["base_fingerprint"]

    @property
    def base_model(self):
        return self.config["base_model"]

    @property
    def specs(self):
        return {spec.name: spec for spec in task_specs(self.config, os.path.join(self.path, CONFIG_NAME))}

    def bottleneck(self, task):
        return self.specs[task].methods.get("adapter", {}).get("bottleneck", 0)

    @property
    def all_rows(self):
        """Whether it stores all 30 added rows (a checkpoint converted from the authors' code,
        whose training moved every added row). Only each task's own rows are combined, as the
        authors' combine_all.py did; its task's generable tokens keep identical logits."""
        return ALL_ROWS in self.tensors

    def task_tensors(self, task):
        return select_task_tensors(self.tensors, self.specs[task])

    def task_masks(self, task):
        return select_task_tensors(self.masks, self.specs[task])


@dataclass
class Combined:
    """What the combined VLM holds, before any backbone is loaded."""
    base_model: str
    fingerprint: str
    specs: dict                                    # task -> TaskSpec (id, rows, methods), by task id
    tensors: dict                                  # union of the tasks' tensors
    sources: dict                                  # task -> checkpoint folder its tensors come from (verify)
    masks: dict = field(default_factory=dict)      # pruning masks of the tasks' pruned tensors
    origins: dict = field(default_factory=dict)    # task -> per-task checkpoint it was trained as (manifest)
    tokenizer_path: str = ""
    task_meta: dict = field(default_factory=dict)  # task -> config entries kept as they are
                                                   # (a user task's template)


# --- reading -----------------------------------------------------------------------------------

def load_task_checkpoints(paths):
    """[TaskCheckpoint] for adapter checkpoint folders; anything else is a VLMError naming the path."""
    return [load_task_checkpoint(path) for path in paths]


def load_task_checkpoint(path):
    if not os.path.exists(path):
        raise VLMError(f"{path}: no such checkpoint folder")
    if not os.path.isdir(path):
        raise VLMError(f"{path}: not a checkpoint folder (it is a file)")
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise VLMError(f"{path}: not a vlm checkpoint (no {CONFIG_NAME})")
    config = read_config(path)  # unreadable or non-vlm JSON: VLMError naming the file
    if config["mode"] != "adapter":
        raise VLMError(f"{path}: a {config['mode']} checkpoint (a whole GPT-2 of its own); only task-module "
                       f"checkpoints (train.py --method ... or --adapter_bottleneck) combine into one model")
    _check_adapter_config(path, config)
    tensors, masks = load_sparse_tensors(os.path.join(path, ADAPTER_WEIGHTS))
    _check_tensors(path, config, tensors)
    return TaskCheckpoint(path, config, tensors, masks)


def _check_adapter_config(path, config):
    where = os.path.join(path, CONFIG_NAME)
    specs = task_specs(config, where)  # ids, rows and method options: each problem one error naming the file
    seen = {}
    for spec in specs:
        if spec.task_id in seen:
            raise VLMError(f"{where}: tasks {seen[spec.task_id]} and {spec.name} "
                           f"share task_id {spec.task_id}")
        seen[spec.task_id] = spec.name
        if not set(spec.token_ids) <= set(SPECIAL_IDS):
            raise VLMError(f"{where}: task {spec.name}: token_ids must be among the added tokens "
                           f"{SPECIAL_IDS[0]}-{SPECIAL_IDS[-1]}")
    for key in ("base_model", "base_fingerprint"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise VLMError(f"{where}: {key!r} is missing")
    gpt2 = config.get("gpt2_config")
    if not isinstance(gpt2, dict) or not all(isinstance(gpt2.get(k), int)
                                             for k in ("n_layer", "n_embd", "n_head")):
        raise VLMError(f"{where}: 'gpt2_config' lacks n_layer/n_embd/n_head")


def _check_tensors(path, config, tensors):
    """The file holds exactly the listed tasks' tensors, in the shapes the config implies."""
    gpt2 = GPT2Config.from_dict(config["gpt2_config"])
    expected = expected_shapes(task_specs(config, os.path.join(path, CONFIG_NAME)), gpt2)
    if ALL_ROWS in tensors:  # converted authors' checkpoints (see TaskCheckpoint.all_rows)
        expected[ALL_ROWS] = (VOCAB_SIZE - GPT2_VOCAB_SIZE, gpt2.n_embd)
    where = os.path.join(path, ADAPTER_WEIGHTS)
    check_tensor_shapes(dict(sorted(tensors.items())), expected, where,
                        f"not one of the tasks in {CONFIG_NAME}")


def read_manifest_sources(path):
    """task -> source checkpoint recorded in a VLM's manifest.json ({} when it has none)."""
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        return {}
    manifest, _ = read_json_file(manifest_path, "manifest")
    try:
        return {t["name"]: t["source"] for t in manifest["tasks"]
                if isinstance(t["name"], str) and isinstance(t["source"], str)}
    except (KeyError, TypeError):
        raise VLMError(f"{manifest_path}: not a {MANIFEST_FORMAT} file") from None


# --- combining ---------------------------------------------------------------------------------

def combine(checkpoints, base_vlm=None, remove=(), replace=False):
    """Combined from per-task checkpoints, optionally on top of an existing VLM (a TaskCheckpoint).

    remove: tasks dropped from base_vlm. replace: a checkpoint may replace base_vlm's adapter for
    its task (without it that is an error). Tasks kept from base_vlm keep their tensors unchanged."""
    if base_vlm is None and (remove or replace):
        raise VLMError(f"{'--remove' if remove else '--replace'} applies to an existing VLM: pass --vlm PATH")
    if base_vlm is None and not checkpoints:
        raise VLMError("no checkpoints to combine: pass adapter checkpoint folders")
    if base_vlm is not None and not checkpoints and not remove:
        raise VLMError(f"--vlm {base_vlm.path}: nothing to change (pass checkpoints to add or --remove TASK)")

    reference = base_vlm or checkpoints[0]
    for checkpoint in checkpoints:
        if checkpoint.fingerprint != reference.fingerprint:
            raise VLMError(f"{checkpoint.path}: built on another backbone than {reference.path} (fingerprint "
                           f"{checkpoint.fingerprint[:12]} vs {reference.fingerprint[:12]})")

    given = {}  # task -> the checkpoint that brings it
    for checkpoint in checkpoints:
        for task in checkpoint.tasks:
            if task in given:
                raise VLMError(f"{checkpoint.path}: a second checkpoint for task {task} "
                               f"(already given by {given[task].path})")
            given[task] = checkpoint

    sources, origins = {}, {}
    if base_vlm is not None:
        for task in remove:
            if task not in base_vlm.tasks:
                raise VLMError(f"--remove {task}: the VLM {base_vlm.path} has no task {task} "
                               f"(has: {', '.join(base_vlm.tasks)})")
            if task in given:
                raise VLMError(f"--remove {task} and {given[task].path} bring the same task; "
                               f"to replace its adapter use --replace")
        recorded = read_manifest_sources(base_vlm.path)
        for task in base_vlm.tasks:
            if task in remove:
                continue
            if task in given:
                if not replace:
                    raise VLMError(f"{given[task].path}: task {task} is already in the VLM {base_vlm.path}; "
                                   f"pass --replace to replace its adapter")
                continue
            sources[task] = base_vlm
            origins[task] = recorded.get(task, os.path.abspath(base_vlm.path))
    for task, checkpoint in given.items():
        sources[task] = checkpoint
        origins[task] = os.path.abspath(checkpoint.path)
    if not sources:
        raise VLMError(f"--remove would leave the VLM {base_vlm.path} without any task")

    specs = combined_specs({task: sources[task].specs[task] for task in sources})
    tensors, masks = {}, {}
    for task in specs:
        tensors.update(sources[task].task_tensors(task))
        masks.update(sources[task].task_masks(task))
    order = list(specs)
    meta = {t: {k: v for k, v in sources[t].config["tasks"][t].items() if k not in TASK_ENTRY_KEYS}
            for t in order}
    return Combined(base_model=reference.base_model, fingerprint=reference.fingerprint,
                    specs=specs, tensors=tensors, masks=masks,
                    sources={t: sources[t].path for t in order}, origins={t: origins[t] for t in order},
                    tokenizer_path=reference.path, task_meta={t: m for t, m in meta.items() if m})


def combined_specs(specs):
    """{task: TaskSpec} in one model: ids kept where they are free (the five built-in tasks always
    have theirs), a clash moved to the next free id; two tasks claiming one token row fail."""
    taken, owners, result = set(), {}, {}
    for name, spec in sorted(specs.items(), key=lambda item: item[1].task_id):
        for token in spec.token_ids:
            if token in owners:
                raise VLMError(f"tasks {owners[token]} and {name} both own the special token row {token}")
            owners[token] = name
        task_id = spec.task_id
        while task_id in taken:
            task_id += 1
        taken.add(task_id)
        result[name] = TaskSpec(name, task_id, spec.token_ids, spec.methods)
    return result


def build_model(combined, backbone=None):
    """The combined VersatileLM over the backbone (default: the one the checkpoints record)."""
    name = backbone or combined.base_model
    gpt2 = load_backbone(name)
    fingerprint = backbone_fingerprint(gpt2)
    if fingerprint != combined.fingerprint:
        raise VLMError(f"{name}: not the backbone the adapters were trained on (fingerprint "
                       f"{fingerprint[:12]}, the checkpoints record {combined.fingerprint[:12]})")
    model = VersatileLM(gpt2, list(combined.specs.values()))
    load_task_tensors(model, combined.tensors, "combined checkpoint")
    install_masks(model, combined.masks, "combined checkpoint")  # pruned tasks stay compact when saved
    return model.eval()


# --- verifying ---------------------------------------------------------------------------------

def sample_inputs(spec):
    """(input_ids, token_type_ids, virtual_ids): a few random sequences, the same in every run, that
    use GPT-2 tokens, the task's own special tokens (so its task embeddings enter the computation)
    and, for a task with virtual tokens, all of them first."""
    generator = torch.Generator().manual_seed(SAMPLE_SEED + zlib.crc32(spec.name.encode()))
    input_ids = torch.randint(0, GPT2_VOCAB_SIZE, (SAMPLE_ROWS, SAMPLE_LENGTH), generator=generator)
    token_type_ids = torch.randint(0, GPT2_VOCAB_SIZE, input_ids.shape, generator=generator)
    if spec.token_ids:
        own = torch.tensor(spec.token_ids)
        input_ids[:, 0] = own[0]  # bos
        input_ids[:, 3::4] = own[torch.randint(0, len(own), input_ids[:, 3::4].shape, generator=generator)]
        token_type_ids = own[torch.randint(0, len(own), input_ids.shape, generator=generator)]
    n = max([method_class(m).virtual_token_count(o) for m, o in spec.methods.items()] or [0])
    virtual_ids = torch.full(input_ids.shape, -1)
    if n:
        input_ids = torch.cat([torch.full((SAMPLE_ROWS, n), PAD_ID), input_ids], dim=1)
        token_type_ids = torch.cat([torch.full((SAMPLE_ROWS, n), -1), token_type_ids], dim=1)
        virtual_ids = torch.cat([torch.arange(n).expand(SAMPLE_ROWS, n), virtual_ids], dim=1)
    return input_ids, token_type_ids, virtual_ids


def comparable_token_ids(spec):
    """Vocabulary columns on which a task's logits must agree between its checkpoint and the VLM:
    the tokens the task can generate (GPT-2's and its own special tokens). The other added rows
    (`<pad>`, other tasks' tokens) are banned when decoding it, and
    their columns differ by design: the VLM holds the other tasks' trained rows, a single-task
    checkpoint their init."""
    banned = set(SPECIAL_IDS) - set(spec.token_ids)
    return torch.tensor([i for i in range(VOCAB_SIZE) if i not in banned])


@torch.no_grad()
def task_logits(model, spec, input_ids, token_type_ids, virtual_ids):
    """The model's logits for a task (every row routed to it), on comparable_token_ids(spec)."""
    device = model.device
    logits = model(input_ids.to(device), token_type_ids=token_type_ids.to(device),
                   task_ids=model.task_id(spec.name), virtual_ids=virtual_ids.to(device)).logits
    return logits[..., comparable_token_ids(spec).to(logits.device)].cpu()


def verify(combined, sources, backbone=None, log=None):
    """{task: largest |logit difference|} between the combined model and each task's source.

    combined: a VersatileLM; sources: task -> checkpoint folder (loaded with load_checkpoint, each
    folder once). Any difference at all is a VLMError: the rows and arithmetic are the same, so
    the logits must be identical, not merely close."""
    by_path = {}
    for task, path in sources.items():
        by_path.setdefault(path, []).append(task)
    differences, failed = {}, []
    for path, tasks in by_path.items():
        source, _, _ = load_checkpoint(path, base_model=backbone)
        for task in tasks:
            spec = combined.tasks[task].spec()
            inputs = sample_inputs(spec)
            got, expected = task_logits(combined, spec, *inputs), task_logits(source, spec, *inputs)
            differences[task] = (got - expected).abs().max().item()
            if not torch.equal(got, expected):
                failed.append(task)
            if log:
                log(f"verified {task}: largest |logit difference| {differences[task]} over "
                    f"{got.shape[0]}x{got.shape[1]} positions x {got.shape[2]:,} tokens (vs {path})")
        del source
    if failed:
        raise VLMError("the combined model's logits differ from the source checkpoint's for "
                       + ", ".join(f"{t} (largest difference {differences[t]})" for t in failed))
    return differences


# --- writing -----------------------------------------------------------------------------------

def check_output_dir(output_dir, vlm_path=None):
    """The output folder must be new or empty, or be the --vlm being updated (holding only VLM files)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise VLMError(f"--output_dir {output_dir}: exists and is not a folder")
    if not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return
    if vlm_path is None or not os.path.isdir(vlm_path) or not os.path.samefile(output_dir, vlm_path):
        raise VLMError(f"--output_dir {output_dir}: exists and is not empty (only the --vlm being updated "
                       f"is overwritten)")
    foreign = sorted(set(os.listdir(output_dir)) - VLM_FILES)
    if foreign:
        raise VLMError(f"--output_dir {output_dir}: holds {foreign[0]}, which is not part of a combined VLM; "
                       f"write the update to a new --output_dir")


def write_vlm(combined, output_dir, backbone=None, vlm_path=None, log=print):
    """Build, save, reload and verify the combined VLM in a temporary folder beside output_dir,
    then rename it into place; returns the manifest. On any error nothing is left behind."""
    check_output_dir(output_dir, vlm_path)
    with atomic_folder(output_dir) as tmp:
        model = build_model(combined, backbone)
        backbone_stats = _backbone_stats(model)
        base_model = resolve_base_name(backbone) if backbone else combined.base_model
        save_checkpoint(model, load_tokenizer(combined.tokenizer_path), tmp, "adapter", list(combined.specs),
                        base_model, combined.fingerprint, task_meta=combined.task_meta)
        del model
        # Verify what was written, as a user will load it, not the object it was written from.
        reloaded, _, _ = load_checkpoint(tmp, base_model=backbone)
        differences = verify(reloaded, combined.sources, backbone, log)
        manifest = build_manifest(combined, reloaded, tmp, base_model, backbone_stats, differences)
        write_json(os.path.join(tmp, MANIFEST_NAME), manifest)
    return manifest


def _backbone_stats(model):
    """Parameters and bytes of the backbone as a separately fine-tuned copy would hold it
    (GPT-2's own 50,257-row vocabulary; the output layer is tied to it and not counted twice)."""
    wte = model.gpt2.get_input_embeddings().weight
    added = (wte.shape[0] - GPT2_VOCAB_SIZE) * wte.shape[1]
    parameters = sum(p.numel() for p in model.gpt2.parameters()) - added
    return {"parameters": parameters, "bytes": parameters * wte.element_size()}


def build_manifest(combined, model, folder, base_model, backbone_stats, differences):
    tasks = []
    for task, spec in combined.specs.items():
        tensors = select_task_tensors(combined.tensors, spec)
        embedding = sum(v.numel() for k, v in tensors.items() if k.startswith("task_embeddings."))
        total = sum(t.numel() for t in tensors.values())
        tasks.append({"name": task, "task_id": spec.task_id, "methods": spec.methods,
                      "bottleneck": spec.methods.get("adapter", {}).get("bottleneck", 0),
                      "adapter_parameters": total - embedding, "task_embedding_parameters": embedding,
                      "parameters": total,
                      "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                      "source": combined.origins[task]})
        sparsity = task_summary(model.tasks[task])
        if sparsity is not None:  # pruned tensors: stored as their kept values and a bit mask
            tasks[-1]["bytes"] -= sparsity["dense_bytes"] - sparsity["stored_bytes"]
            tasks[-1]["sparsity"] = sparsity
    extra = sum(t["parameters"] for t in tasks)
    return {
        "format": MANIFEST_FORMAT, "version": 2,
        "backbone": {"name": base_model, "fingerprint": combined.fingerprint, **backbone_stats},
        "tasks": tasks,
        "extra_parameters": extra,
        "adapters_file": ADAPTER_WEIGHTS,
        "adapters_file_bytes": os.path.getsize(os.path.join(folder, ADAPTER_WEIGHTS)),
        "total_parameters": backbone_stats["parameters"] + extra,
        "separate_models_parameters": len(tasks) * backbone_stats["parameters"],
        "verification": {"inputs": f"{SAMPLE_ROWS} random sequences of {SAMPLE_LENGTH} tokens per task",
                         "max_abs_logit_difference": differences},
    }


def select_task_tensors(tensors, spec):
    """The tensors of one task: its special-token rows and its methods' tensors."""
    prefixes = tuple(key_prefix(spec.name, m) for m in spec.methods)
    return {k: v for k, v in tensors.items()
            if k == f"task_embeddings.{spec.name}" or (prefixes and k.startswith(prefixes))}


def describe_methods(methods):
    """`adapter(bottleneck=300)+lora(r=4)` style, for tables."""
    if not methods:
        return "task embeddings"
    return "+".join(f"{m}({', '.join(f'{k}={v}' for k, v in o.items() if k != 'reparameterize')})"
                    if m != "adapter" else f"adapter {o['bottleneck']}" for m, o in methods.items())


# --- reporting ---------------------------------------------------------------------------------

def _mb(n_bytes):
    return f"{n_bytes / 1e6:,.2f}"


def size_report(manifest):
    """A table: each task's extra parameters and MB against N separately fine-tuned backbones."""
    header = (f"{'task':<14}{'id':>3}{'bottleneck':>12}{'modules':>13}"
              f"{'task emb.':>11}{'extra params':>14}{'MB':>9}")
    lines = [header, "-" * len(header)]
    for t in manifest["tasks"]:
        lines.append(f"{t['name']:<14}{t['task_id']:>3}{t['bottleneck']:>12}{t['adapter_parameters']:>13,}"
                     f"{t['task_embedding_parameters']:>11,}{t['parameters']:>14,}{_mb(t['bytes']):>9}")
    lines.append("-" * len(header))
    n = len(manifest["tasks"])
    backbone = manifest["backbone"]
    extra, size = manifest["extra_parameters"], manifest["adapters_file_bytes"]
    lines.append(f"{f'all {n} task(s)':<53}{extra:>14,}{_mb(size):>9}  ({manifest['adapters_file']})")
    one = backbone["parameters"]
    lines.append(f"backbone {backbone['name']}: {one:,} parameters, {_mb(backbone['bytes'])} MB, "
                 f"referenced (fingerprint {backbone['fingerprint'][:12]}), not copied")
    lines.append(f"one VLM: {one:,} + {extra:,} = {manifest['total_parameters']:,} parameters "
                 f"(adapters add {100 * extra / one:.2f}% to the backbone)")
    separate = manifest["separate_models_parameters"]
    lines.append(f"{n} separately fine-tuned {'copy' if n == 1 else 'copies'}: "
                 f"{n} x {one:,} = {separate:,} parameters, "
                 f"{_mb(n * backbone['bytes'])} MB; the VLM is "
                 f"{100 * manifest['total_parameters'] / separate:.1f}% of that")
    return "\n".join(lines)
