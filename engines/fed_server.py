"""The server of federated.py (a Flower ServerApp's main): rounds of FedAvg over one task's module,
each round's global module validated (NLL over the validation split, the task's metric on its
first --eval_prompts prompts) and kept as an ordinary task checkpoint, `checkpoint_round<N>/`,
which evaluate.py, combine_all.py and serve.py read as they read train.py's output. Beside it
the folder holds the server's state (the global module in training form and the run's records),
written before the folder is renamed into place; --resume continues after the newest one.

Each round depends only on (global module, seed, round): clients are sampled by client id with a
seeded generator, client seeds follow the round, DP noise is drawn after seeding numpy with the
round, so a run resumed after SIGKILL ends as the uninterrupted one."""
import json
import logging
import os
import time

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engines.fed_report import client_entry, plot_rounds, round_record
from engines.fed_strategy import (
    CONFIG,
    METRICS,
    build_strategy,
    exchange,
    from_record,
    payload_bytes,
    privacy_report,
    round_config,
    screen_replies,
    to_record,
    wait_for_clients,
)
from engines.generate import DecodingOptions, generate
from engines.loaders import add_virtual_positions, load_splits, make_loader
from engines.run_state import METRICS_FILE, CheckpointKeeper, MetricsLog
from engines.runtime import resolve_device, set_seed
from engines.settings import user_tasks
from engines.steps import create_evaluator
from engines.training import build_model, checkpoint_task_meta, json_ready
from models.checkpoint import check_tensor_shapes, load_task_tensors, save_checkpoint, task_state_dict
from models.vlm import backbone_fingerprint
from tasks.table import get_task
from utils.data import load_tokenizer
from utils.errors import VLMError
from utils.io import atomic_path, write_json

logger = logging.getLogger(__name__)

ROUND_PREFIX = "checkpoint_round"
STATE_JSON, STATE_TENSORS = "federated_state.json", "federated_state.safetensors"
ARGS_FILE, PLOT_FILE = "federated_args.json", "federated.png"
# The flags a resumed run must find unchanged (--rounds may grow).
FEDERATED_SETTINGS = ("task", "task_file", "model_checkpoint", "dataset_path", "methods", "max_history",
                      "train_batch_size", "gradient_accumulation_steps", "lr", "max_norm", "local_epochs",
                      "seed", "clients", "partition", "alpha", "fraction_fit", "min_fit_clients", "dp_noise",
                      "dp_clip", "dp_delta")


def client_settings(args, task):
    """What every client is sent (JSON): the task, train.py's arguments and the split."""
    return json.dumps({"task": task.name, "task_entry": dict(task_id=task.task_id, **task.checkpoint_meta()),
                       "train": dict(json_ready(args), task_file=None), "local_epochs": args.local_epochs,
                       "seed": args.seed, "clients": args.clients, "partition": args.partition,
                       "alpha": args.alpha})


class GlobalModule:
    """The server's model of the task: loads a global module, validates it, writes checkpoints."""

    def __init__(self, args, task):
        self.args, self.task = args, task
        self.device = resolve_device(args.device or "cpu")
        self.tokenizer = load_tokenizer(args.model_checkpoint)
        data = load_splits(args, self.task, self.tokenizer)
        set_seed(args.seed)  # the initial module is the one train.py --seed starts from
        self.model = build_model(args, self.task, "adapter").to(self.device).eval()
        self.fingerprint = backbone_fingerprint(self.model.gpt2)
        n_virtual = sum(t.num_virtual_tokens for t in self.model.tasks.values())
        valid_split = self.task.splits[1]
        valid = self.task.training_examples(data[valid_split], args.max_history,
                                            max_positions=self.model.config.n_positions - n_virtual,
                                            where=f"{args.dataset_path} split {valid_split!r}")
        self.valid_loader = make_loader(add_virtual_positions(valid, n_virtual), self.task.task_id,
                                        args.valid_batch_size, shuffle=False)
        self.prompts = self.task.dataset_prompts(data[valid_split], args.max_history, self.tokenizer,
                                                 self.model.task_id(self.task.name))[:args.eval_prompts]
        self.initial = task_state_dict(self.model, [self.task.name], exported=False)
        self.shapes = {name: tuple(t.shape) for name, t in self.initial.items()}
        # what full fine-tuning would send each way per client: all of GPT-2 (with its added rows), float32
        self.full_bytes = 4 * sum(p.numel() for p in self.model.gpt2.parameters())

    def load(self, tensors):
        load_task_tensors(self.model, tensors, "the global module")

    @torch.inference_mode()
    def evaluate(self):
        nll = create_evaluator(self.model, self.device).run(self.valid_loader).metrics
        result = {"nll": nll["nll"], "ppl": nll["ppl"], "metrics": {}}
        if self.prompts:
            options = DecodingOptions(max_length=self.args.eval_max_length, no_sample=True,
                                      seed=self.args.seed)
            generated = generate(self.model, self.prompts, options, batch_size=self.args.valid_batch_size,
                                 progress=False)
            outputs = [self.task.output_text(self.tokenizer, ids) for ids in generated]
            scores = self.task.score(outputs, self.prompts)
            result["metrics"] = {name: float(value) for name, value in scores.items()
                                 if isinstance(value, (int, float)) and not isinstance(value, bool)}
        return result

    def save(self, path, server_round):
        save_checkpoint(self.model, self.tokenizer, path, "adapter", [self.task.name],
                        self.args.model_checkpoint,
                        base_fingerprint=self.fingerprint, exported=True,
                        extra={"federated_args": json_ready(self.args), "federated_round": server_round},
                        task_meta=checkpoint_task_meta([self.task]))


def write_state(path, server_round, tensors, records, rdp, args):
    with atomic_path(os.path.join(path, STATE_TENSORS)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    write_json(os.path.join(path, STATE_JSON),
               {"round": server_round, "records": records, "rdp": rdp,
                "settings": {name: getattr(args, name) for name in FEDERATED_SETTINGS}})


def read_state(output_dir, args, shapes):
    """(round, global tensors, records, rdp) of the newest complete checkpoint_round<N>/."""
    folders = [p for p in CheckpointKeeper(output_dir, None, prefix=ROUND_PREFIX).existing()
               if os.path.isfile(os.path.join(p, STATE_JSON))]
    if not folders:
        raise VLMError(f"--resume: no complete {ROUND_PREFIX}<N>/ (with {STATE_JSON}) in "
                       f"--output_dir {output_dir}")
    path = folders[-1]
    try:
        with open(os.path.join(path, STATE_JSON), encoding="utf-8") as f:
            state = json.load(f)
        tensors = load_file(os.path.join(path, STATE_TENSORS))
    except (OSError, ValueError, SafetensorError) as error:
        raise VLMError(f"{path}: unreadable federated state ({error})") from None
    for name in FEDERATED_SETTINGS:
        if state["settings"].get(name) != getattr(args, name):
            raise VLMError(f"--resume: {path} was trained with --{name} {state['settings'].get(name)}, not "
                           f"{getattr(args, name)}; resume with the run's own settings")
    check_tensor_shapes(tensors, shapes, os.path.join(path, STATE_TENSORS),
                        "not a tensor of the task's module")
    logger.info("resuming from %s (round %d)", path, state["round"])
    return state["round"], tensors, state["records"], state["rdp"]


def refresh_clients(grid, clients_of, needed, timeout):
    """Wait for `needed` connected nodes, forget gone ones and ask new ones their client id."""
    nodes = wait_for_clients(grid, needed, timeout)
    for gone in set(clients_of) - set(nodes):
        del clients_of[gone]
    unknown = [node for node in nodes if node not in clients_of]
    hello = [Message(RecordDict({CONFIG: ConfigRecord({})}), message_type=MessageType.QUERY, dst_node_id=node)
             for node in unknown]
    for node, reply in exchange(grid, hello, timeout) if hello else []:
        if reply is None or reply.has_error():
            logger.warning("node %s did not say its client id; asked again next round", node)
            continue
        client = reply.content[METRICS]["client-id"]
        if client in clients_of.values():
            raise VLMError(f"two SuperNodes have partition-id {client}; give each its own")
        clients_of[node] = client


def run_server(grid, args):
    """Rounds args.rounds of FedAvg (from the newest round with args.resume); the final global module
    goes to args.output_dir, as train.py's final model does."""
    start_time = time.time()
    module = GlobalModule(args, get_task(args.task, user_tasks(args)))
    output_dir = args.output_dir
    metrics_log = MetricsLog(os.path.join(output_dir, METRICS_FILE))
    if args.resume:
        done, tensors, metrics_log.records, rdp = read_state(output_dir, args, module.shapes)
    else:
        os.makedirs(output_dir, exist_ok=True)
        write_json(os.path.join(output_dir, ARGS_FILE), json_ready(args))
        done, tensors, rdp = 0, module.initial, 0.0
        module.load(tensors)
        evaluation = module.evaluate()
        metrics_log.add(round_record(0, evaluation, [], None, time.time() - start_time))
        logger.info("round 0 (initial module): validation nll %.4f", evaluation["nll"])
    state = {"round": done, "tensors": tensors, "rdp": rdp}
    keeper = CheckpointKeeper(output_dir, lambda path, exported=True: module.save(path, state["round"]),
                              save_state=lambda path: write_state(path, state["round"], state["tensors"],
                                                                  metrics_log.records, state["rdp"], args),
                              prefix=ROUND_PREFIX)
    clients_of = {}
    strategy = build_strategy(clients_of, args)
    settings = client_settings(args, module.task)
    for server_round in range(done + 1, args.rounds + 1):
        refresh_clients(grid, clients_of, args.clients if server_round == done + 1 else args.min_fit_clients,
                        args.connect_timeout)
        arrays = to_record(state["tensors"])
        config = round_config(settings, server_round)
        messages = list(strategy.configure_train(server_round, arrays, config, grid))
        pairs = exchange(grid, messages, args.round_timeout)
        usable, left_out = screen_replies(pairs, module.shapes, clients_of)
        np.random.seed((args.seed * 1000003 + server_round) % 2 ** 32)  # Flower's DP noise draws from numpy
        mean, _ = strategy.aggregate_train(server_round, usable)
        if mean is None:
            reasons = "; ".join(f"client {c}: {r}"
                                for c, r in sorted(left_out.items(), key=lambda i: str(i[0])))
            raise VLMError(f"round {server_round}: {len(usable)} usable updates, fewer than "
                           f"--min_fit_clients "
                           f"{args.min_fit_clients} ({reasons or 'no client sampled'}); the global module of "
                           f"round {server_round - 1} is kept; continue with --resume")
        tensors = {name: torch.from_numpy(value.copy()) for name, value in from_record(mean).items()}
        module.load(tensors)
        evaluation = module.evaluate()
        dp = None
        if args.dp_noise is not None:
            weights = [m.content[METRICS]["num-examples"] for m in usable]
            sampled = getattr(strategy, "strategy", strategy).sample_size(args.clients)  # the DP-wrapped one
            dp, state["rdp"] = privacy_report(args, sampled, weights, state["rdp"])
        clients = [client_entry(clients_of.get(node, f"node {node}"), reply,
                                left_out.get(clients_of.get(node, f"node {node}")), payload_bytes(arrays),
                                module.full_bytes, payload_bytes) for node, reply in pairs]
        record = round_record(server_round, evaluation, sorted(clients, key=lambda c: str(c["client"])),
                              metrics_log.records[-1] if metrics_log.records else None,
                              time.time() - start_time, dp)
        state.update(round=server_round, tensors=tensors)
        metrics_log.records.append(record)
        keeper(server_round)  # the round's checkpoint and state, whole or not at all
        metrics_log.records.pop()
        metrics_log.add(record)
        plot_rounds(metrics_log.records, os.path.join(output_dir, PLOT_FILE), module.task.name)
        logger.info("round %d: %d of %d clients averaged, validation nll %.4f%s", server_round, len(usable),
                    len(pairs), evaluation["nll"],
                    "".join(f", {k} {v:.4f}" for k, v in evaluation["metrics"].items()))
    if done >= args.rounds:
        module.load(state["tensors"])
    module.save(output_dir, state["round"])
    plot_rounds(metrics_log.records, os.path.join(output_dir, PLOT_FILE), module.task.name)
    print(f"global module of round {state['round']} saved to {output_dir}")
    return metrics_log.records
