"""The server side of federated.py's FedAvg on Flower: which clients train a round, which updates
count, how they are averaged, and the optional central differential privacy.

- Sampling is over client ids (each SuperNode's `partition-id`), not Flower's node ids, which are
  drawn anew whenever a node connects: a round's sample depends only on (seed, round, clients),
  so a resumed run samples as the uninterrupted one did.
- An update counts when it holds exactly the task's tensors, each float32 with the global
  module's shape and finite values, and a positive example count; any other reply is left out
  with its reason (a client that died, NaN, a wrong shape).
- The average weights each client by its example count, in float64: sum(n_i x_i) / sum(n_i),
  which for one client (or identical ones) gives its tensors back bit for bit.
- Differential privacy wraps the strategy in Flower's DifferentialPrivacyServerSideFixedClipping:
  each update's difference from the global module is clipped to L2 norm --dp_clip, then Gaussian
  noise of std dp_noise x dp_clip / sampled clients is added to the average (`privacy_report`).
"""
import logging
import math
import random
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from utils.errors import VLMError

logger = logging.getLogger(__name__)

NUM_EXAMPLES = "num-examples"  # Flower's key of a reply's weight
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"


# --- tensors on the wire ---------------------------------------------------------------------------
def to_record(tensors):
    """{name: torch tensor or ndarray} -> ArrayRecord (numpy, names kept) in name order: Flower's DP
    wrapper pairs the global module's tensors with an update's by position."""
    def numpy(value):
        return value.detach().cpu().numpy() if hasattr(value, "detach") else value
    return ArrayRecord({name: Array(np.ascontiguousarray(numpy(tensors[name]))) for name in sorted(tensors)})


def from_record(record):
    """ArrayRecord -> {name: ndarray} (numpy's own format, never a pickle)."""
    return {name: array.numpy() for name, array in record.items()}


def payload_bytes(record):
    """Bytes of the tensors an ArrayRecord carries (each tensor's serialized buffer)."""
    return sum(len(array.data) for array in record.values())


# --- which updates count ---------------------------------------------------------------------------
def update_problem(content, expected):
    """Why a reply's content cannot join the average, or None. `expected`: {name: shape}."""
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        return "the reply holds no tensors or no metrics"
    weight = content.metric_records[METRICS].get(NUM_EXAMPLES)
    if isinstance(weight, bool) or not isinstance(weight, int) or weight <= 0:
        return f"{NUM_EXAMPLES} is {weight!r}, not a positive integer"
    record = content.array_records[ARRAYS]
    names = set(record.keys())
    if names != set(expected):
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        return f"tensors differ from the task's: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, shape in expected.items():
        array = record[name]
        if tuple(array.shape) != tuple(shape):
            return f"{name} has shape {tuple(array.shape)}, expected {tuple(shape)}"
        if array.dtype != "float32":
            return f"{name} is {array.dtype}, expected float32"
        if not np.isfinite(array.numpy()).all():
            return f"{name} holds NaN or infinite values"
    return None


def screen_replies(pairs, expected, clients_of):
    """(usable replies, {client: reason} of the others) of [(node id, reply or None)]: no reply,
    an error (a client that died) and bad updates are left out, each logged with its reason.
    clients_of: {node id: client id}."""
    usable, left_out = [], {}
    for node, message in pairs:
        client = clients_of.get(node, f"node {node}")
        if message is None:
            reason = "failed: no reply within --round_timeout"
        elif message.has_error():
            reason = f"failed: {(message.error.reason or 'error').strip().splitlines()[0][:300]}"
        else:
            problem = update_problem(message.content, expected)
            reason = None if problem is None else f"left out: {problem}"
        if reason is None:
            usable.append(message)
        else:
            left_out[client] = reason
            logger.warning("client %s %s", client, reason)
    return usable, left_out


def exchange(grid, messages, timeout, poll=0.2):
    """[(node id, reply or None)] of messages pushed together: replies pulled every `poll` seconds
    until all are in or `timeout` seconds have passed."""
    messages = list(messages)
    nodes = [m.metadata.dst_node_id for m in messages]
    ids = list(grid.push_messages(messages))
    replies, deadline = {}, time.monotonic() + timeout
    for _ in range(int(timeout / poll) + 2):
        waiting = [i for i in ids if i and i not in replies]
        if not waiting:
            break
        for reply in grid.pull_messages(waiting):
            replies[reply.metadata.reply_to_message_id] = reply
        if len(replies) == len(ids) or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return [(node, replies.get(i)) for node, i in zip(nodes, ids)]


def weighted_mean(updates):
    """[({name: ndarray}, weight)] -> {name: float32 ndarray}: sum(w_i x_i) / sum(w_i) in float64."""
    total = float(sum(weight for _, weight in updates))
    return {name: (sum(float(weight) * tensors[name].astype(np.float64) for tensors, weight in updates)
                   / total).astype(np.float32)
            for name in updates[0][0]}


# --- the strategy ----------------------------------------------------------------------------------
class TaskFedAvg(FedAvg):
    """FedAvg of one task's module: samples clients by id, averages the screened updates."""

    def __init__(self, clients_of, fraction_fit, min_fit_clients, seed):
        super().__init__(fraction_train=fraction_fit, fraction_evaluate=0.0, min_train_nodes=min_fit_clients,
                         min_available_nodes=min_fit_clients)
        self.clients_of, self.seed = clients_of, seed  # clients_of: {node id: client id}, kept current

    def sample_size(self, available):
        return min(available, max(int(available * self.fraction_train), self.min_train_nodes))

    def sampled_nodes(self, server_round):
        """Node ids of this round's sample: `sample_size` client ids drawn with (seed, round)."""
        nodes_of = {client: node for node, client in self.clients_of.items()}
        clients = sorted(nodes_of)
        if len(clients) < self.min_train_nodes:
            raise VLMError(f"round {server_round}: {len(clients)} clients connected, fewer than "
                           f"--min_fit_clients {self.min_train_nodes}")
        chosen = random.Random(f"{self.seed}/{server_round}").sample(clients, self.sample_size(len(clients)))
        return [nodes_of[client] for client in sorted(chosen)]

    def configure_train(self, server_round, arrays, config, grid):
        config["server-round"] = server_round
        content = RecordDict({ARRAYS: arrays, CONFIG: config})
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
                for node in self.sampled_nodes(server_round)]

    def aggregate_train(self, server_round, replies):
        """The weighted mean of replies already screened (screen_replies); None when fewer than
        --min_fit_clients are left."""
        replies = list(replies)
        if len(replies) < self.min_train_nodes:
            return None, None
        updates = [(from_record(m.content[ARRAYS]), m.content[METRICS][NUM_EXAMPLES]) for m in replies]
        mean = weighted_mean(updates)
        examples = sum(weight for _, weight in updates)
        return to_record(mean), MetricRecord({NUM_EXAMPLES: examples})

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []  # the server validates the global module itself

    def aggregate_evaluate(self, server_round, replies):
        return None


def build_strategy(clients_of, args):
    """TaskFedAvg, wrapped in Flower's server-side fixed-clipping DP when --dp_noise is given."""
    strategy = TaskFedAvg(clients_of, args.fraction_fit, args.min_fit_clients, args.seed)
    if args.dp_noise is None:
        return strategy
    sampled = strategy.sample_size(args.clients)
    return DifferentialPrivacyServerSideFixedClipping(strategy, args.dp_noise, args.dp_clip, sampled)


def wait_for_clients(grid, count, timeout, poll=0.5):
    """Node ids once `count` nodes are connected; at most `timeout` seconds, polling every `poll`."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / poll) + 2):
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() >= deadline:
            break
        time.sleep(poll)
    raise VLMError(f"--connect_timeout {timeout:g}: {len(nodes)} of --clients {count} clients connected")


# --- differential privacy: what a run reports ------------------------------------------------------
def gaussian_epsilon(rdp_sum, delta):
    """epsilon at `delta` of Gaussian mechanisms composed in Renyi DP: sum_t alpha / (2 z_t^2) =
    alpha * rdp_sum, converted with Mironov (2017), Prop. 3, at the best order alpha:
    epsilon = rdp_sum + 2 sqrt(rdp_sum log(1/delta)). No amplification by sampling is counted."""
    if rdp_sum == 0:
        return 0.0
    if math.isinf(rdp_sum):
        return math.inf
    return rdp_sum + 2.0 * math.sqrt(rdp_sum * math.log(1.0 / delta))


def privacy_report(args, sampled, weights, rdp_before):
    """The round's DP figures and the new RDP sum. weights: the averaged clients' example counts.

    Noise std sigma = dp_noise x dp_clip / sampled (Flower's). One client's clipped update moves the
    weighted mean by at most (its weight share) x dp_clip, so the effective noise multiplier is
    sigma / (max share x dp_clip) = dp_noise / (sampled x max share): dp_noise itself when every
    sampled client holds as many examples."""
    sigma = args.dp_noise * args.dp_clip / sampled
    share = max(weights) / sum(weights)
    effective = sigma / (share * args.dp_clip)
    rdp = rdp_before + (math.inf if effective == 0 else 1.0 / (2.0 * effective ** 2))
    report = {"noise_multiplier": args.dp_noise, "clip": args.dp_clip, "noise_std": sigma,
              "sampled_clients": sampled, "max_weight_share": share, "effective_noise_multiplier": effective,
              "delta": args.dp_delta, "epsilon": gaussian_epsilon(rdp, args.dp_delta)}
    return report, rdp


def round_config(settings_json, server_round):
    """What every sampled client receives besides the tensors: the run's settings (JSON) and round."""
    return ConfigRecord({"settings": settings_json, "server-round": server_round})
