"""The output folder of pretrain.py: the Hugging Face GPT-2 folder every script loads, with its
model card (README.md: shape, data, optimizer, the curve of perplexity and copy loss) and the
curve as a PNG."""
import os
import platform
import sys

import torch
from transformers import GPT2LMHeadModel

from utils.vocab import GPT2_VOCAB_SIZE


def save_model_folder(model, tokenizer, args, metrics_log):
    """The Hugging Face GPT-2 folder (weights in --save_dtype), each file renamed into place."""
    import tempfile
    output_dir = args.output_dir
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".model.") as tmp:
        dtype = {"float32": torch.float32, "float16": torch.float16}[args.save_dtype]
        copy = GPT2LMHeadModel(model.config)
        copy.load_state_dict(model.state_dict())
        copy.to(dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(model, args, metrics_log))
        if metrics_log:
            plot_curve(metrics_log, os.path.join(tmp, CURVE_PNG))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))


CURVE_PNG = "pretraining_curve.png"


def plot_curve(metrics_log, path):
    """Validation perplexity of each held-out file against tokens seen (log y) and, where the run
    recorded it, the copy test's loss on the repeat (right axis), as a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(metrics_log[-1]["valid"])
    for name in names:
        points = [(r["tokens"], r["valid"][name]["ppl"]) for r in metrics_log if name in r.get("valid", {})]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity")
    ax.set_title("pretraining")
    handles, labels = ax.get_legend_handles_labels()
    copies = [(r["tokens"], r["copy"]["repeat"]) for r in metrics_log if "copy" in r]
    if copies:
        right = ax.twinx()
        right.plot([p[0] for p in copies], [p[1] for p in copies], color="black", linestyle="--", marker=".",
                   label="copy test: loss on the repeat")
        right.set_ylabel("copy loss (nats per token)")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def model_card(model, args, metrics_log):
    """README.md of the output folder: what the model is and how it was made, from the run itself."""
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel() + model.transformer.wpe.weight.numel()
    last = metrics_log[-1] if metrics_log else None
    lines = [f"# GPT-2 pretrained with vlm's pretrain.py ({cfg.n_layer} layers, {cfg.n_embd} wide)", "",
             "A small GPT-2 trained with `pretrain.py` of this repository. "
             f"It keeps GPT-2's tokenizer and its {GPT2_VOCAB_SIZE:,} token ids.", "",
             "| | |", "|---|---|",
             f"| shape | {cfg.n_layer} layers, {cfg.n_embd} wide, "
             f"{cfg.n_head} heads, {cfg.n_positions} positions |",
             f"| parameters | {n_params:,} ({embedding:,} of them token and position embeddings; "
             f"output layer tied) |",
             f"| weights | {args.save_dtype} safetensors |",
             f"| initial weights | {_init(args)} |",
             f"| training text | {', '.join(f'`{s}`' for s in args.train_files)} |",
             f"| synthetic text | {_synthetic(args)} |",
             f"| block size, batch | {args.block_size} tokens, "
             f"{args.batch_size} x {args.gradient_accumulation_steps} accumulation x processes |",
             f"| optimizer | AdamW lr {args.lr:g} ({args.schedule} to {args.min_lr:g} "
             f"after {args.warmup_steps} warmup steps), betas {args.beta1}/{args.beta2}, "
             f"weight decay {args.weight_decay}, clip {args.max_norm}, dropout {args.dropout} |"]
    if last:
        lines += [f"| steps | {last['step']:,} |",
                  f"| tokens seen | {last['tokens']:,} |",
                  f"| wall time | {last['elapsed'] / 3600:.2f} h |"]
        for name, r in last["valid"].items():
            lines.append(f"| validation `{name}` | perplexity {r['ppl']:.2f} (nll {r['nll']:.4f}) |")
        if "copy" in last:
            lines.append(f"| copy test (`python -m models.copy_test`) | "
                         f"loss on the repeat {last['copy']['repeat']:.3f} "
                         f"nats, first pass {last['copy']['first']:.3f} |")
    lines += [f"| hardware | {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads |",
              "", "Command:", "", "```", "python " + " ".join(_quote(a) for a in sys.argv), "```", "",
              f"Curve: `metrics.jsonl` in the run folder (one line per validation), "
              f"plotted in `{CURVE_PNG}`.", ""]
    lines += curve_table(metrics_log)
    return "\n".join(lines)


def _init(args):
    if args.model_checkpoint:
        return f"continued from `{args.model_checkpoint}`"
    if getattr(args, "init", "random") == "induction":
        return ("GPT-2's random init plus an induction circuit set by hand in layers 0-1 "
                "(`models/induction_init.py`: a previous-token head, then heads that copy the token after an "
                "earlier occurrence of the current one); every weight trained from there")
    return "GPT-2's random init"


def _synthetic(args):
    if not getattr(args, "copy_fraction", 0):
        return "none"
    random_share = args.copy_random_share
    return (f"{args.copy_fraction:.0%} of training blocks are repeated spans (span, gap of 0..span natural "
            f"tokens, the same span again; spans of 8-64 tokens, {random_share:.0%} of them random token ids "
            f"and {1 - random_share:.0%} natural text), the rest plain text")


def curve_table(metrics_log, rows=12):
    """Markdown lines: tokens, each validation perplexity and the copy loss, at about `rows` evenly
    spaced validations (the last one always)."""
    if not metrics_log:
        return []
    names = list(metrics_log[-1]["valid"])
    step = max(1, -(-len(metrics_log) // rows))
    chosen = metrics_log[step - 1::step]
    if chosen[-1] is not metrics_log[-1]:
        chosen.append(metrics_log[-1])
    has_copy = any("copy" in r for r in metrics_log)
    header = ["tokens"] + [f"{name} ppl" for name in names] + (["copy loss (repeat)"] if has_copy else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for r in chosen:
        cells = [f"{r['tokens']:,}"] + [f"{r['valid'][n]['ppl']:.1f}" if n in r["valid"] else ""
                                        for n in names]
        if has_copy:
            cells.append(f"{r['copy']['repeat']:.3f}" if "copy" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _quote(text):
    import shlex
    return shlex.quote(text)
