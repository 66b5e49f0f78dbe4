"""One model for every task: combine per-task adapter checkpoints into one Versatile Language Model.

Adapter checkpoints trained over one backbone hold disjoint tensors: `adapters.<task>.*` and
`task_embeddings.<task>` (the task's own special-token rows; adapter training leaves every other
added row at its fixed-seed init). Combining is therefore a union of tensor dicts, with no
arithmetic on weights, and the combined model computes each task's outputs with the very same
rows and operations as the task's own checkpoint. verify() checks that bit for bit on sample
inputs before anything is written.

    checkpoints = load_task_checkpoints(paths)
    combined = combine(checkpoints, base_vlm=None, remove=(), replace=False)
    manifest = write_vlm(combined, output_dir)      # builds, saves to a temp folder, verifies, renames
    print(size_report(manifest))
"""
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch

from models.adapters import AdapterStack
from models.checkpoint import (ADAPTER_WEIGHTS, CONFIG_NAME, _load_tensors, load_adapter_tensors,
                               load_checkpoint, read_config, resolve_base_name, save_checkpoint)
from models.vlm import VOCAB_SIZE, VersatileLM, backbone_fingerprint, load_backbone
from utils.data import load_tokenizer, read_json_file
from utils.errors import VLMError
from utils.io import write_json
from utils.tasks import GPT2_VOCAB_SIZE, TASKS, banned_token_ids, task_token_ids

MANIFEST_NAME = "manifest.json"
ALL_ROWS = "special_token_rows"  # optional tensor of adapter checkpoints: all 30 added rows
MANIFEST_FORMAT = "vlm-manifest"
# Files a combined VLM folder may hold; an in-place update replaces the folder as a whole, so it
# refuses a folder with anything else in it (say a train.py output with checkpoint_epoch* folders).
VLM_FILES = {CONFIG_NAME, ADAPTER_WEIGHTS, MANIFEST_NAME, "tokenizer.json", "tokenizer_config.json",
             "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja"}
# Sample inputs of verify(): a few random sequences per task, the same in every run.
SAMPLE_SEED, SAMPLE_ROWS, SAMPLE_LENGTH = 1234, 3, 16


@dataclass
class TaskCheckpoint:
    """An adapter checkpoint folder as read from disk: its vlm_config.json and its tensors."""
    path: str
    config: dict
    tensors: dict  # name -> tensor, exactly as stored in adapters.safetensors

    @property
    def tasks(self):
        return list(self.config["tasks"])

    @property
    def fingerprint(self):
        return self.config["base_fingerprint"]

    @property
    def base_model(self):
        return self.config["base_model"]

    def bottleneck(self, task):
        return self.config["tasks"][task]["bottleneck"]

    @property
    def all_rows(self):
        """Whether it stores all 30 added rows (a checkpoint converted from the authors' code,
        whose training moved every added row). Only each task's own rows are combined, as the
        authors' combine_all.py did; its task's generable tokens keep identical logits."""
        return ALL_ROWS in self.tensors

    def task_tensors(self, task):
        prefix = f"adapters.{task}."
        return {k: v for k, v in self.tensors.items() if k == f"task_embeddings.{task}" or k.startswith(prefix)}


@dataclass
class Combined:
    """What the combined VLM holds, before any backbone is loaded."""
    base_model: str
    fingerprint: str
    bottlenecks: dict                              # task -> bottleneck (0: task embeddings only), by task id
    tensors: dict                                  # union of the tasks' tensors
    sources: dict                                  # task -> checkpoint folder its tensors come from (verify)
    origins: dict = field(default_factory=dict)    # task -> per-task checkpoint it was trained as (manifest)
    tokenizer_path: str = ""


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
        raise VLMError(f"{path}: a {config['mode']} checkpoint (a whole GPT-2 of its own); only adapter "
                       f"checkpoints (train.py --adapter_bottleneck) combine into one model")
    _check_adapter_config(path, config)
    tensors = _load_tensors(os.path.join(path, ADAPTER_WEIGHTS))
    _check_tensors(path, config, tensors)
    return TaskCheckpoint(path, config, tensors)


def _check_adapter_config(path, config):
    where = os.path.join(path, CONFIG_NAME)
    tasks = config.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise VLMError(f"{where}: 'tasks' must name at least one task")
    for task, settings in tasks.items():
        if task not in TASKS:
            raise VLMError(f"{where}: unknown task {task!r}")
        bottleneck = settings.get("bottleneck") if isinstance(settings, dict) else None
        if not isinstance(bottleneck, int) or isinstance(bottleneck, bool) or bottleneck < 0:
            raise VLMError(f"{where}: task {task}: 'bottleneck' must be a non-negative integer")
        if settings.get("task_id") != TASKS[task].task_id:
            raise VLMError(f"{where}: task {task} has task_id {settings.get('task_id')!r}; "
                           f"this code gives it {TASKS[task].task_id}")
    for key in ("base_model", "base_fingerprint"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise VLMError(f"{where}: {key!r} is missing")
    gpt2 = config.get("gpt2_config")
    if not isinstance(gpt2, dict) or not all(isinstance(gpt2.get(k), int) for k in ("n_layer", "n_embd")):
        raise VLMError(f"{where}: 'gpt2_config' lacks n_layer/n_embd")


def _check_tensors(path, config, tensors):
    """The file holds exactly the listed tasks' tensors, in the shapes the config implies."""
    gpt2 = config["gpt2_config"]
    n_layer, d_model = gpt2["n_layer"], gpt2["n_embd"]
    expected = {}
    if ALL_ROWS in tensors:  # converted authors' checkpoints (see TaskCheckpoint.all_rows)
        expected[ALL_ROWS] = (VOCAB_SIZE - GPT2_VOCAB_SIZE, d_model)
    for task, settings in config["tasks"].items():
        expected[f"task_embeddings.{task}"] = (len(TASKS[task].special_tokens), d_model)
        if settings["bottleneck"] > 0:
            with torch.device("meta"):  # shapes only, nothing allocated
                stack = AdapterStack(n_layer, d_model, settings["bottleneck"])
            expected.update({f"adapters.{task}.{k}": tuple(v.shape) for k, v in stack.state_dict().items()})
    where = os.path.join(path, ADAPTER_WEIGHTS)
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise VLMError(f"{where}: unexpected tensor {unexpected[0]!r} (not one of the tasks in {CONFIG_NAME})")
    for key, shape in expected.items():
        if key not in tensors:
            raise VLMError(f"{where}: missing tensor {key!r}")
        if tuple(tensors[key].shape) != shape:
            raise VLMError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")


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
            if task not in TASKS:
                raise VLMError(f"--remove {task}: unknown task; choose one of {', '.join(TASKS)}")
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

    order = sorted(sources, key=lambda t: TASKS[t].task_id)
    tensors = {}
    for task in order:
        tensors.update(sources[task].task_tensors(task))
    return Combined(base_model=reference.base_model, fingerprint=reference.fingerprint,
                    bottlenecks={t: sources[t].bottleneck(t) for t in order}, tensors=tensors,
                    sources={t: sources[t].path for t in order}, origins={t: origins[t] for t in order},
                    tokenizer_path=reference.path)


def build_model(combined, backbone=None):
    """The combined VersatileLM over the backbone (default: the one the checkpoints record)."""
    name = backbone or combined.base_model
    gpt2 = load_backbone(name)
    fingerprint = backbone_fingerprint(gpt2)
    if fingerprint != combined.fingerprint:
        raise VLMError(f"{name}: not the backbone the adapters were trained on (fingerprint "
                       f"{fingerprint[:12]}, the checkpoints record {combined.fingerprint[:12]})")
    model = VersatileLM(gpt2, {t: b for t, b in combined.bottlenecks.items() if b > 0})
    load_adapter_tensors(model, combined.tensors, "combined checkpoint")
    return model.eval()


# --- verifying ---------------------------------------------------------------------------------

def sample_inputs(task):
    """(input_ids, token_type_ids): a few random sequences, the same in every run, that use GPT-2
    tokens and the task's own special tokens (so its task embeddings enter the computation)."""
    generator = torch.Generator().manual_seed(SAMPLE_SEED + TASKS[task].task_id)
    own = torch.tensor(task_token_ids(TASKS[task]))
    input_ids = torch.randint(0, GPT2_VOCAB_SIZE, (SAMPLE_ROWS, SAMPLE_LENGTH), generator=generator)
    input_ids[:, 0] = own[0]  # bos
    input_ids[:, 3::4] = own[torch.randint(0, len(own), input_ids[:, 3::4].shape, generator=generator)]
    token_type_ids = own[torch.randint(0, len(own), input_ids.shape, generator=generator)]
    return input_ids, token_type_ids


def comparable_token_ids(task):
    """Vocabulary columns on which a task's logits must agree between its checkpoint and the VLM:
    the tokens the task can generate (GPT-2's and its own special tokens). The other added rows
    (`<pad>`, other tasks' tokens) are banned when decoding it (utils.tasks.banned_token_ids), and
    their columns differ by design: the VLM holds the other tasks' trained rows, a single-task
    checkpoint their init."""
    banned = set(banned_token_ids(TASKS[task]))
    return torch.tensor([i for i in range(VOCAB_SIZE) if i not in banned])


@torch.no_grad()
def task_logits(model, task, input_ids, token_type_ids):
    """The model's logits for `task` (every row routed to it), on comparable_token_ids(task)."""
    task_id = TASKS[task].task_id if task in model.adapters else -1  # task embeddings only: plain GPT-2
    logits = model(input_ids.to(model.device), token_type_ids=token_type_ids.to(model.device),
                   task_ids=torch.full((input_ids.shape[0],), task_id), use_cache=False).logits
    return logits[..., comparable_token_ids(task).to(logits.device)].cpu()


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
            inputs = sample_inputs(task)
            got, expected = task_logits(combined, task, *inputs), task_logits(source, task, *inputs)
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
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output_dir))}.", suffix=".tmp", dir=parent)
    try:
        model = build_model(combined, backbone)
        backbone_stats = _backbone_stats(model)
        base_model = resolve_base_name(backbone) if backbone else combined.base_model
        save_checkpoint(model, load_tokenizer(combined.tokenizer_path), tmp, "adapter", list(combined.bottlenecks),
                        base_model, combined.fingerprint)
        del model
        # Verify what was written, as a user will load it, not the object it was written from.
        reloaded, _, _ = load_checkpoint(tmp, base_model=backbone)
        differences = verify(reloaded, combined.sources, backbone, log)
        manifest = build_manifest(combined, reloaded, tmp, base_model, backbone_stats, differences)
        write_json(os.path.join(tmp, MANIFEST_NAME), manifest)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; give it a folder's usual mode
        _install(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _install(tmp, output_dir):
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        # Updating a VLM in place: move the old one aside, the new one in, then delete the old one.
        # A crash between the two renames leaves no half-written VLM, only both complete folders.
        old = tempfile.mkdtemp(prefix=os.path.basename(tmp) + ".old", dir=os.path.dirname(tmp))
        os.rmdir(old)
        os.rename(output_dir, old)
        os.rename(tmp, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output_dir)  # a rename replaces a missing or empty folder in one step


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _backbone_stats(model):
    """Parameters and bytes of the backbone as a separately fine-tuned copy would hold it
    (GPT-2's own 50,257-row vocabulary; the output layer is tied to it and not counted twice)."""
    wte = model.gpt2.get_input_embeddings().weight
    added = (wte.shape[0] - GPT2_VOCAB_SIZE) * wte.shape[1]
    parameters = sum(p.numel() for p in model.gpt2.parameters()) - added
    return {"parameters": parameters, "bytes": parameters * wte.element_size()}


def build_manifest(combined, model, folder, base_model, backbone_stats, differences):
    tasks = []
    for task, bottleneck in combined.bottlenecks.items():
        tensors = {k: v for k, v in combined.tensors.items()
                   if k == f"task_embeddings.{task}" or k.startswith(f"adapters.{task}.")}
        embedding = tensors[f"task_embeddings.{task}"].numel()
        total = sum(t.numel() for t in tensors.values())
        tasks.append({"name": task, "task_id": TASKS[task].task_id, "bottleneck": bottleneck,
                      "adapter_parameters": total - embedding, "task_embedding_parameters": embedding,
                      "parameters": total, "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                      "source": combined.origins[task]})
    extra = sum(t["parameters"] for t in tasks)
    return {
        "format": MANIFEST_FORMAT, "version": 1,
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


# --- reporting ---------------------------------------------------------------------------------

def _mb(n_bytes):
    return f"{n_bytes / 1e6:,.2f}"


def size_report(manifest):
    """A table: each task's extra parameters and MB against N separately fine-tuned backbones."""
    header = f"{'task':<14}{'id':>3}{'bottleneck':>12}{'adapter':>13}{'task emb.':>11}{'extra params':>14}{'MB':>9}"
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
    lines.append(f"{n} separately fine-tuned {'copy' if n == 1 else 'copies'}: {n} x {one:,} = {separate:,} parameters, "
                 f"{_mb(n * backbone['bytes'])} MB; the VLM is {100 * manifest['total_parameters'] / separate:.1f}% "
                 f"of that")
    return "\n".join(lines)
