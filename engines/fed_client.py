"""The client side of federated.py: one round of local training is train.py's own run loop
(engines/training.py's train_run, the same seed, batches, optimizer and schedule) on the client's
data, started from the server's global module; the reply holds the task's tensors in their
training form, the client's example count, local loss and validation NLL.

A client's data: its SuperNode's node config names it. `partition-id=I` (Flower's simulation sets
it) is its client id; with `dataset-path=PATH` the client trains on its own dataset (a real
deployment), otherwise on part I of the run's --dataset_path split among --clients
(engines/fed_data.py; validation: every clients-th record from I). `model-checkpoint` and `device`
may point a client at its own copy of the backbone and its own device.
"""
import json
import logging
import os
import tempfile
from argparse import Namespace

import torch

from engines.fed_data import client_identity, split_indices
from engines.loaders import add_virtual_positions, load_splits, make_loaders, split_examples
from engines.runtime import resolve_device
from engines.settings import RESUME_SETTINGS
from engines.training import RunPlan, build_model, checkpoint_task_meta, train_run
from models.checkpoint import load_task_tensors, task_state_dict
from models.vlm import backbone_fingerprint
from tasks.table import get_task
from tasks.task_file import recorded_user_tasks
from utils.data import load_tokenizer
from utils.errors import VLMError

logger = logging.getLogger(__name__)

# Test aid: "KIND@CLIENT:ROUND,..." makes client CLIENT misbehave in ROUND: die (the process exits
# when the round's training message arrives), nan (one tensor of its update is NaN) or shape (one
# tensor loses a row). Never set in real runs.
FAULTS_ENV = "VLM_FEDERATED_FAULTS"


def planned_fault(client, server_round):
    for item in filter(None, os.environ.get(FAULTS_ENV, "").split(",")):
        kind, _, where = item.partition("@")
        if where == f"{client}:{server_round}":
            return kind
    return None


def settings_task(settings):
    """The task object of the run's settings (a user task rebuilt from the template they carry)."""
    entry = settings["task_entry"]
    if "template" in entry:
        tasks = recorded_user_tasks({"tasks": {settings["task"]: entry}}, "the server's settings")
        return tasks[settings["task"]]
    return get_task(settings["task"])


def local_args(settings, server_round, node_config, own_path, output_dir):
    """train.py's arguments for one client's round: the run's, local_epochs epochs, the round's seed."""
    args = Namespace(**settings["train"])
    for name in RESUME_SETTINGS:  # flags of features federated runs do not use
        if not hasattr(args, name):
            setattr(args, name, None)
    args.n_epochs = settings["local_epochs"]
    args.seed = settings["seed"] + server_round - 1  # round 1 trains exactly as train.py with --seed
    args.output_dir, args.resume, args.eval_before_start = output_dir, False, False
    if own_path:
        args.dataset_path = own_path
    for key, name in (("model-checkpoint", "model_checkpoint"), ("device", "device")):
        if node_config.get(key):
            setattr(args, name, str(node_config[key]))
    return args


def client_plan(args, task, share, global_tensors, counts):
    """build_plan for train_run: as train.py's single_task_plan, on the client's share of the data
    (share(train records, valid records) -> both, cut), with the global module loaded."""
    def build(world_size, rank):
        tokenizer = load_tokenizer(args.model_checkpoint)
        data = load_splits(args, task, tokenizer)
        train_split, valid_split = task.splits
        data = dict(data)
        data[train_split], data[valid_split] = share(data[train_split], data[valid_split])
        model = build_model(args, task, "adapter")
        fingerprint = backbone_fingerprint(model.gpt2)
        n_virtual = sum(t.num_virtual_tokens for t in model.tasks.values())
        train_examples, valid_examples = split_examples(args, task, data,
                                                        model.config.n_positions - n_virtual)
        train_examples = add_virtual_positions(train_examples, n_virtual)
        valid_examples = add_virtual_positions(valid_examples, n_virtual)
        train_loader, valid_loader = make_loaders(train_examples, valid_examples, task.task_id, args,
                                                  world_size, rank)
        load_task_tensors(model, global_tensors, "the server's global module")
        counts["examples"] = len(train_examples)
        return RunPlan(model=model, tokenizer=tokenizer, mode="adapter", tasks=task.name,
                       checkpoint_mode="adapter", fingerprint=fingerprint, train_loader=train_loader,
                       valid_loaders={task.name: valid_loader},
                       use_task_ids=True, extra={}, per_task_metrics=False,
                       task_meta=checkpoint_task_meta([task]))
    return build


def data_share(settings, task, client, own_path):
    """share(train, valid) -> the client's records: all of its own dataset, or its part of the run's."""
    if own_path:
        return lambda train, valid: (train, valid)
    clients = settings["clients"]
    if client >= clients:
        raise VLMError(f"node config: partition-id {client} is not below the run's --clients {clients}")

    def share(train, valid):
        parts = split_indices(task, train, clients, settings["partition"], settings["alpha"],
                              settings["seed"], min_records=settings["train"]["train_batch_size"])
        if len(valid) < clients:
            raise VLMError(f"{settings['train']['dataset_path']}: {len(valid)} validation records for "
                           f"{clients} clients")
        return [train[i] for i in parts[client]], valid[client::clients]
    return share


def train_round(settings, server_round, global_tensors, node_config):
    """One client's round: ({name: tensor} in training form, metrics for the reply)."""
    client, own_path = client_identity(node_config)
    fault = planned_fault(client, server_round)
    if fault == "die":
        os._exit(1)  # as a killed client: no reply, no clean-up
    task = settings_task(settings)
    counts = {}
    with tempfile.TemporaryDirectory(prefix="vlm-federated-client-") as output_dir:
        args = local_args(settings, server_round, node_config, own_path, output_dir)
        build = client_plan(args, task, data_share(settings, task, client, own_path), global_tensors, counts)
        result = train_run(args, resolve_device(args.device or "cpu"), False, RESUME_SETTINGS, build)
    tensors = task_state_dict(result.model, [task.name], exported=False)
    if fault in ("nan", "shape"):
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].clone().fill_(float("nan")) if fault == "nan" else tensors[name][1:]
    losses = result.step_losses
    last = result.metrics[-1] if result.metrics else {}
    metrics = {"client-id": client, "num-examples": counts["examples"],
               "train-loss": float(sum(losses) / len(losses)) if losses else float("nan"),
               "val-nll": float(last.get("val_nll", float("nan")))}
    return tensors, metrics


def decode_settings(text):
    try:
        return json.loads(text)
    except ValueError:
        raise VLMError("the server's settings are not JSON") from None


def global_tensors_of(arrays):
    """{name: torch tensor} of the global module the server sent ({name: ndarray})."""
    return {name: torch.from_numpy(value.copy()) for name, value in arrays.items()}
