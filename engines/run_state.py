"""What a run leaves on disk and what --resume reads back: epoch checkpoints written whole or not
at all, the training state (optimizer moments, random generators, scheduler, sampler), and
metrics.jsonl. Tensors go to safetensors and everything else to JSON; nothing is pickled."""
import contextlib
import json
import os
import random
import re
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from utils.errors import VLMError
from utils.io import atomic_path, write_json, write_text

KEEP_CHECKPOINTS = 3
CHECKPOINT_PREFIX = "checkpoint_epoch"
METRICS_FILE = "metrics.jsonl"
# A checkpoint folder also holds what --resume needs: tensors (optimizer moments, torch random
# states) in safetensors, everything else in JSON; nothing is pickled. The JSON file is written last.
TRAINING_TENSORS = "training_state.safetensors"
TRAINING_STATE = "training_state.json"


class CheckpointKeeper:
    """Writes `<output_dir>/checkpoint_epoch<N>/` and deletes all but the newest `keep`.

    Crash safety: the folder is written as `.checkpoint_epoch<N>.partial/` (model files by `save`,
    then the training state by `save_state`, its JSON file last), flushed to disk and only then
    renamed to its final name, so a checkpoint_epoch<N>/ folder is always complete."""

    def __init__(self, output_dir, save, keep=KEEP_CHECKPOINTS, save_state=None, prefix=CHECKPOINT_PREFIX):
        self.output_dir, self.save, self.keep, self.save_state = output_dir, save, keep, save_state
        self.prefix = prefix  # federated.py keeps checkpoint_round<N>/ folders

    def existing(self):
        found = []
        for name in os.listdir(self.output_dir) if os.path.isdir(self.output_dir) else []:
            match = re.fullmatch(re.escape(self.prefix) + r"(\d+)", name)
            if match and os.path.isdir(os.path.join(self.output_dir, name)):
                found.append((int(match.group(1)), os.path.join(self.output_dir, name)))
        return [path for _, path in sorted(found)]

    def __call__(self, epoch):
        name = f"{self.prefix}{epoch}"
        path = os.path.join(self.output_dir, name)
        partial = os.path.join(self.output_dir, f".{name}.partial")
        if os.path.isdir(partial):  # left by a killed run
            shutil.rmtree(partial)
        self.save(partial, exported=False)
        if self.save_state is not None:
            self.save_state(partial)
        sync_folder(partial)
        if os.path.isdir(path):  # a stale one (a run resumed before it): swap it out, then replace
            stale = os.path.join(self.output_dir, f".{name}.stale")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(path, stale)
            shutil.rmtree(stale)
        os.replace(partial, path)
        sync_folder(self.output_dir, files=False)
        for old in self.existing()[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old)
        return path


def sync_folder(path, files=True):
    """fsync a folder's files and the folder itself (so a rename after it cannot precede the data)."""
    if files:
        for name in os.listdir(path):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    os.fsync(f.fileno())
    with contextlib.suppress(OSError):  # folders cannot be opened for fsync on every platform
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def complete_checkpoints(output_dir):
    """[(epoch, path)] of the checkpoint folders --resume can continue from, oldest first."""
    found = []
    for path in CheckpointKeeper(output_dir, None).existing():
        if os.path.isfile(os.path.join(path, TRAINING_STATE)):
            found.append((int(os.path.basename(path)[len(CHECKPOINT_PREFIX):]), path))
    return found


def latest_complete_checkpoint(output_dir):
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def random_states():
    """(JSON-ready dict, tensors) of the python, numpy, torch and CUDA random generators."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss]}
    with contextlib.suppress(ImportError):
        import numpy
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = cuda_state
    return state, tensors


def restore_random_states(state, tensors):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy
        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def optimizer_state(optimizer):
    """(JSON-ready dict, tensors) of optimizer.state_dict(): tensors keyed optimizer.<param>.<name>.

    Matrices that are mostly zero rows are stored as their nonzero rows (`.rows` indices and
    `.values`): in adapter and emb_only training the whole embedding table is a parameter but only
    the task's rows get gradients, and storing its full Adam moments would cost 2 x the table."""
    full = optimizer.state_dict()
    tensors, scalars, sparse = {}, {}, {}
    for index, values in full["state"].items():
        for name, value in values.items():
            key = f"optimizer.{index}.{name}"
            if not torch.is_tensor(value):
                scalars.setdefault(str(index), {})[name] = value
                continue
            value = value.detach().to("cpu").contiguous()
            if value.dim() >= 2:
                rows = value.reshape(value.shape[0], -1).ne(0).any(dim=1).nonzero().flatten()
                if 2 * len(rows) < value.shape[0]:
                    tensors[key + ".rows"], tensors[key + ".values"] = rows, value[rows].contiguous()
                    sparse[key] = list(value.shape)
                    continue
            tensors[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
              for group in full["param_groups"]]
    return {"param_groups": groups, "scalars": scalars, "sparse": sparse}, tensors


def restore_optimizer(optimizer, state, tensors, where):
    tensors, values = dict(tensors), {}
    for key, shape in state["sparse"].items():  # rebuilt first: their .rows/.values keys are skipped below
        rows, kept = tensors[key + ".rows"], tensors[key + ".values"]
        tensors[key] = torch.zeros(shape, dtype=kept.dtype).index_copy_(0, rows, kept)
    for key, tensor in tensors.items():
        if key.startswith("optimizer.") and key.rsplit(".", 1)[0] not in state["sparse"]:
            _, index, name = key.split(".", 2)
            values.setdefault(int(index), {})[name] = tensor
    for index, scalars in state["scalars"].items():
        values.setdefault(int(index), {}).update(scalars)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
              for group in state["param_groups"]]
    try:
        optimizer.load_state_dict({"state": values, "param_groups": groups})
    except (ValueError, KeyError) as error:
        raise VLMError(f"{where}: optimizer state does not fit this model ({error})") from None


def write_training_state(path, trainer, optimizer, scheduler, sampler, args, settings, running_loss=None):
    """The training-state files of a checkpoint folder; TRAINING_STATE (the JSON) comes last."""
    optimizer_json, tensors = optimizer_state(optimizer)
    random_json, random_tensors = random_states()
    tensors.update(random_tensors)
    with atomic_path(os.path.join(path, TRAINING_TENSORS)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    scaler = getattr(trainer, "grad_scaler", None)
    state = {"engine": {"iteration": trainer.state.iteration, "epoch_length": trainer.state.epoch_length,
                        "max_epochs": trainer.state.max_epochs},
             "epoch": trainer.state.epoch, "sampler_epoch": sampler.epoch,
             "lr_scheduler": dict(scheduler.state_dict()) if scheduler is not None else None,
             "grad_scaler": dict(scaler.state_dict()) if scaler is not None else None,
             "optimizer": optimizer_json, "random": random_json,
             "running_loss": None if running_loss is None else float(running_loss),
             "settings": {name: getattr(args, name) for name in settings}}
    write_json(os.path.join(path, TRAINING_STATE), state)


def read_training_state(path):
    """(state dict, tensors) of a complete checkpoint folder."""
    state_file, tensor_file = os.path.join(path, TRAINING_STATE), os.path.join(path, TRAINING_TENSORS)
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as error:
        raise VLMError(f"{state_file}: unreadable training state ({error})") from None
    try:
        tensors = load_file(tensor_file)
    except (OSError, SafetensorError) as error:
        raise VLMError(f"{tensor_file}: corrupted or truncated safetensors file ({error})") from None
    return state, tensors


def check_resume_settings(state, args, path, settings):
    """`settings`: the flags --resume must find unchanged (engines/settings.py)."""
    for name in settings:
        saved, now = state["settings"].get(name), getattr(args, name)
        if saved != now:
            raise VLMError(f"--resume: {path} was trained with --{name} {saved}, not {now}; "
                           f"resume with the run's own settings")


def read_metrics(path, last_iteration):
    """The records of an earlier run's metrics.jsonl up to `last_iteration` (for a resumed run)."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                raise VLMError(f"{path}: line {number} is not JSON") from None
            if record.get("iteration", 0) <= last_iteration:
                records.append(record)
    return records


class MetricsLog:
    """`metrics.jsonl`: one JSON object per validation, the whole file rewritten atomically."""

    def __init__(self, path):
        self.path, self.records = path, []

    def add(self, record):
        self.records.append(record)
        write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.records))
