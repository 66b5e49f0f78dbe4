"""How federated.py splits one task's training data among its clients: IID (a seeded shuffle dealt
round robin) or skewed by a Dirichlet(alpha) draw over the task's partition key (tasks/*.py:
`partition_key(record)`: sentiment's label, an assistant request's intent, E2E's restaurant name,
mt's source-length bucket), as FedNLP and FedPETuning split their benchmarks: for every key, the
shares of the clients come from Dirichlet(alpha, ..., alpha) and its records (in a seeded order) are
cut at those shares. Small alpha: each client sees few keys; large alpha: close to IID.

A split depends only on (keys, clients, kind, alpha, seed), so every client computes the same one
and takes its own part (`client_identity`: which part is a SuperNode's); real deployments give
each client its own dataset instead."""
import numpy as np

from utils.errors import VLMError

PARTITIONS = ("iid", "dirichlet")
MAX_DRAWS = 100  # Dirichlet draws tried before giving up on giving every client min_records


def iid_split(count, clients, seed):
    """[[record index]] per client: a seeded permutation dealt round robin (sizes differ by <= 1)."""
    order = np.random.default_rng(seed).permutation(count)
    return [sorted(int(i) for i in order[client::clients]) for client in range(clients)]


def dirichlet_split(keys, clients, alpha, seed, min_records=1):
    """[[record index]] per client, skewed by Dirichlet(alpha) over `keys` (one per record). Draws
    again (same generator) until every client has min_records; MAX_DRAWS failures are an error."""
    if not (alpha > 0 and np.isfinite(alpha)):
        raise VLMError(f"--alpha must be a positive number, got {alpha}")
    rng = np.random.default_rng(seed)
    by_key = {}
    for index, key in enumerate(keys):
        by_key.setdefault(key, []).append(index)
    for _ in range(MAX_DRAWS):
        parts = [[] for _ in range(clients)]
        for key in sorted(by_key):
            indices = np.array(by_key[key])[rng.permutation(len(by_key[key]))]
            shares = rng.dirichlet([alpha] * clients)
            cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
            for client, piece in enumerate(np.split(indices, cuts)):
                parts[client].extend(int(i) for i in piece)
        if min(len(part) for part in parts) >= min_records:
            return [sorted(part) for part in parts]
    raise VLMError(f"--partition dirichlet --alpha {alpha:g}: {MAX_DRAWS} draws left a client with fewer "
                   f"than {min_records} training records ({len(keys)} records, {len(by_key)} keys, "
                   f"{clients} clients); "
                   "raise --alpha or lower --clients")


def split_indices(task, records, clients, partition, alpha, seed, min_records=1):
    """[[record index]] per client of a task's training records."""
    if partition not in PARTITIONS:
        raise VLMError(f"--partition {partition}: choose {' or '.join(PARTITIONS)}")
    if len(records) < clients * min_records:
        raise VLMError(f"--clients {clients}: the training split has {len(records)} records, too few for "
                       f"{min_records} per client")
    if partition == "iid":
        return iid_split(len(records), clients, seed)
    return dirichlet_split([task.partition_key(r) for r in records], clients, alpha, seed, min_records)


def client_identity(node_config):
    """(client id, own dataset path or None) from a SuperNode's node config: `partition-id` names
    the client (Flower's simulation sets it); `dataset-path` points it at its own data."""
    client = node_config.get("partition-id")
    if isinstance(client, bool) or not isinstance(client, int) or client < 0:
        raise VLMError(f"node config: partition-id must be a non-negative integer (the client's id), "
                       f"got {client!r}")
    path = node_config.get("dataset-path")
    return client, (str(path) if path else None)
