"""What a federated run reports per round: the records of metrics.jsonl and the plot federated.png
(the global module's validation NLL and task metric, each client's local loss, and the bytes the
run exchanged against what full fine-tuning would have, the communication saving of FedPETuning)."""
import math

from utils.io import atomic_path


def finite_or_none(value):
    """JSON has no NaN or infinity: such a figure is recorded as null."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def client_entry(client, reply, reason, bytes_down, full_bytes, payload_bytes):
    """One client's part of a round record (reply: its message, or None when it sent none)."""
    entry = {"client": client, "status": reason or "ok", "bytes_down": bytes_down,
             "full_ft_bytes_down": full_bytes}
    if reply is not None and not reply.has_error():
        metrics = reply.content.metric_records.get("metrics", {})
        arrays = reply.content.array_records.get("arrays")
        entry.update(examples=metrics.get("num-examples"),
                     train_loss=finite_or_none(metrics.get("train-loss")),
                     val_nll=finite_or_none(metrics.get("val-nll")),
                     bytes_up=payload_bytes(arrays) if arrays is not None else 0,
                     full_ft_bytes_up=full_bytes if arrays is not None else 0)
    else:
        entry.update(examples=None, train_loss=None, val_nll=None, bytes_up=0, full_ft_bytes_up=0)
    return entry


def round_record(server_round, evaluation, clients, previous, elapsed, dp=None):
    """metrics.jsonl's record of a round; `previous`: the record before it (cumulative bytes)."""
    sent = sum(c["bytes_down"] + c["bytes_up"] for c in clients)
    full = sum(c["full_ft_bytes_down"] + c["full_ft_bytes_up"] for c in clients)
    record = {"round": server_round, "val_nll": evaluation["nll"],
              "val_ppl": finite_or_none(evaluation["ppl"]),
              "metrics": evaluation["metrics"], "clients": clients,
              "participants": sum(c["status"] == "ok" for c in clients),
              "bytes": sent, "full_ft_bytes": full,
              "communication_saving": full / sent if sent else None,
              "cumulative_bytes": (previous or {}).get("cumulative_bytes", 0) + sent,
              "cumulative_full_ft_bytes": (previous or {}).get("cumulative_full_ft_bytes", 0) + full,
              "elapsed": round(elapsed, 3)}
    if dp is not None:
        record["dp"] = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in dp.items()}
    return record


def plot_rounds(records, path, task_name):
    """federated.png: validation NLL (and the task's first metric), clients' local losses, and
    cumulative megabytes exchanged against full fine-tuning's (log scale)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    left.plot(rounds, [r["val_nll"] for r in records], marker="o", color="tab:blue")
    left.set(xlabel="round", ylabel="validation NLL", title=f"{task_name}: global module")
    metric = next((name for r in records for name in r.get("metrics", {})), None)
    if metric is not None:
        twin = left.twinx()
        twin.plot(rounds, [r.get("metrics", {}).get(metric) for r in records], marker="s", color="tab:orange")
        twin.set_ylabel(metric, color="tab:orange")
    clients = sorted({c["client"] for r in records for c in r.get("clients", [])}, key=str)
    for client in clients:
        points = [(r["round"], c["train_loss"]) for r in records for c in r.get("clients", [])
                  if c["client"] == client and c["train_loss"] is not None]
        if points:
            middle.plot(*zip(*points), marker=".", label=f"client {client}")
    middle.set(xlabel="round", ylabel="local training loss", title="clients")
    if clients:
        middle.legend(fontsize=7)
    trained = [r for r in records if r["round"] > 0]
    if trained:
        right.plot([r["round"] for r in trained], [r["cumulative_bytes"] / 1e6 for r in trained], marker="o",
                   label="task module (this run)")
        right.plot([r["round"] for r in trained], [r["cumulative_full_ft_bytes"] / 1e6 for r in trained],
                   marker="o", label="full fine-tuning")
        saving = trained[-1]["cumulative_full_ft_bytes"] / max(trained[-1]["cumulative_bytes"], 1)
        right.set_yscale("log")
        right.legend(fontsize=8)
        right.set_title(f"sent + received: {saving:,.0f}x less than full fine-tuning")
    right.set(xlabel="round", ylabel="cumulative MB")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
