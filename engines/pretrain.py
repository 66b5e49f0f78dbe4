"""Causal-LM pretraining (or continued pretraining) of a GPT-2 on plain-text files: what pretrain.py runs.

- The model: random from a config (--n_layer, --n_embd, --n_head, --n_positions) or any
  `from_pretrained` GPT-2 (--model_checkpoint), always with GPT-2's own 50,257-token vocabulary
  and tokenizer, so the toolkit's special-token ids 50257-50286 stay valid on top of it.
- The data: utils.corpus.BlockStream (streamed, packed into --block_size blocks, bounded memory).
- The loop: an ignite Engine; AdamW (weight decay on matrices only), linear warmup then cosine or
  linear decay, gradient clipping, accumulation; one iteration = one micro-batch per process.
  Every --eval_interval optimizer steps: validation perplexity on each held-out file, a line in
  metrics.jsonl, TensorBoard scalars and an atomic checkpoint (--resume continues from it and
  ends with the same weights as an uninterrupted run).
- The result: a Hugging Face GPT-2 folder (model.safetensors, config.json, tokenizer files) that
  every script loads with --model_checkpoint, plus README.md, a model card of the run.
"""
import contextlib
import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from engines.pretrain_card import save_model_folder
from models.copy_test import copy_losses
from models.losses import linear_cross_entropy
from utils.corpus import BlockStream, CopyMix, check_text_file, parse_corpus_spec, validation_blocks
from utils.data import REPO_TOKENIZER
from utils.errors import VLMError
from utils.io import write_json, write_text
from utils.vocab import GPT2_VOCAB_SIZE

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
WEIGHTS = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
# Flags that decide the course of a run: --resume refuses other values.
RESUME_SETTINGS = ("train_files", "valid_files", "model_checkpoint", "n_layer", "n_embd", "n_head",
                   "n_positions", "block_size", "batch_size", "gradient_accumulation_steps", "max_steps",
                   "warmup_steps", "lr", "min_lr", "schedule", "weight_decay", "beta1", "beta2", "max_norm",
                   "dropout", "seed", "eval_interval", "valid_tokens", "shuffle_blocks", "dtype",
                   "blank_line_documents", "copy_fraction", "copy_random_share", "init")
# Settings added after runs were already checkpointed: a run saved without one had its default.
LATER_SETTINGS = {"blank_line_documents": [], "copy_fraction": 0.0, "copy_random_share": 0.5,
                  "init": "random"}


# --- settings --------------------------------------------------------------------------------
def check_args(args):
    """Check flags and files before anything heavy starts; fills defaults in place."""
    positive = ["block_size", "batch_size", "gradient_accumulation_steps", "max_steps", "eval_interval",
                "valid_tokens", "shuffle_blocks"]
    for name in positive:
        if getattr(args, name) < 1:
            raise VLMError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("lr", "max_norm"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            raise VLMError(f"--{name} must be a positive number, got {getattr(args, name)}")
    if not (0 <= args.min_lr <= args.lr):
        raise VLMError(f"--min_lr must be between 0 and --lr {args.lr}, got {args.min_lr}")
    if args.warmup_steps < 0 or args.warmup_steps > args.max_steps:
        raise VLMError(f"--warmup_steps must be between 0 and --max_steps {args.max_steps}, "
                       f"got {args.warmup_steps}")
    if not (0 <= args.dropout < 1):
        raise VLMError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.weight_decay < 0:
        raise VLMError(f"--weight_decay must be 0 or more, got {args.weight_decay}")
    for spec in args.train_files:
        check_text_file(parse_corpus_spec(spec)[0], "--train_files")
    if not (0 <= args.copy_fraction < 1):
        raise VLMError(f"--copy_fraction must be in [0, 1), got {args.copy_fraction}")
    if not (0 <= args.copy_random_share <= 1):
        raise VLMError(f"--copy_random_share must be in [0, 1], got {args.copy_random_share}")
    train_paths = {os.path.abspath(parse_corpus_spec(spec)[0]) for spec in args.train_files}
    for path in args.blank_line_documents:
        if os.path.abspath(path) not in train_paths:
            raise VLMError(f"--blank_line_documents {path}: not one of --train_files")
    if not args.valid_files:
        raise VLMError("--valid_files: name at least one held-out text file")
    for path in args.valid_files:
        check_text_file(path, "--valid_files")
    if args.model_checkpoint is not None and args.init != "random":
        raise VLMError(f"--init {args.init} builds a fresh model; --model_checkpoint continues one: "
                       "give one of them")
    if args.model_checkpoint is None:
        for name in ("n_layer", "n_embd", "n_head", "n_positions"):
            if getattr(args, name) < 1:
                raise VLMError(f"--{name} must be at least 1, got {getattr(args, name)}")
        if args.n_embd % args.n_head:
            raise VLMError(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise VLMError(f"--output_dir {args.output_dir}: exists and is not a folder")
    if args.resume:
        if not os.path.isfile(os.path.join(args.output_dir, CHECKPOINT_DIR, STATE_JSON)):
            raise VLMError(f"--resume: no complete {CHECKPOINT_DIR}/ in --output_dir {args.output_dir}")
    elif os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        raise VLMError(f"--output_dir {args.output_dir}: folder is not empty; "
                       "choose a new one or pass --resume")


def autocast_dtype(name):
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# --- model -----------------------------------------------------------------------------------
def load_tokenizer():
    """GPT-2's own tokenizer (50,257 tokens) from the repository: the stand-in keeps GPT-2's ids."""
    return GPT2TokenizerFast.from_pretrained(REPO_TOKENIZER)


def build_model(args):
    """A GPT-2 LM from a config (random, seeded) or from a GPT-2 folder / hub name."""
    if args.model_checkpoint is None and args.init == "induction":
        from models.induction_init import induction_gpt2
        try:
            model = induction_gpt2(args.n_layer, args.n_embd, args.n_head, args.n_positions,
                                   GPT2_VOCAB_SIZE, seed=args.seed)
        except ValueError as error:
            raise VLMError(f"--init induction: {error}") from None
    elif args.model_checkpoint is None:
        torch.manual_seed(args.seed)
        config = GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                            n_positions=args.n_positions, vocab_size=GPT2_VOCAB_SIZE)
        model = GPT2LMHeadModel(config)
    else:
        try:
            model = GPT2LMHeadModel.from_pretrained(args.model_checkpoint)
        except (OSError, ValueError) as error:
            raise VLMError(f"--model_checkpoint {args.model_checkpoint}: "
                           f"cannot load a GPT-2 model ({error})") from None
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != GPT2_VOCAB_SIZE:
        raise VLMError(f"--model_checkpoint {args.model_checkpoint}: has {rows} token rows; "
                       f"pretraining keeps GPT-2's own {GPT2_VOCAB_SIZE} "
                       "(a toolkit checkpoint with special tokens is not a backbone)")
    if args.block_size > model.config.n_positions:
        raise VLMError(f"--block_size {args.block_size} is more than the model's "
                       f"{model.config.n_positions} positions (n_positions)")
    for module in model.modules():  # dropout of this run only; the saved config keeps its own values
        if isinstance(module, torch.nn.Dropout):
            module.p = args.dropout
    return model


def parameter_groups(model, weight_decay):
    """Weight decay on matrices (embeddings included), none on biases and LayerNorm gains."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step, args):
    """lr at optimizer step `step` (0-based): linear warmup to --lr, then cosine or linear to --min_lr."""
    if args.warmup_steps and step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    span = max(args.max_steps - args.warmup_steps, 1)
    progress = min(max(step - args.warmup_steps, 0) / span, 1.0)
    if args.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return args.min_lr + (args.lr - args.min_lr) * factor


class CausalLMLoss(torch.nn.Module):
    """(sum of next-token NLL over every position, count) of blocks (batch, block_size), as a
    module so DistributedDataParallel can wrap it. The output layer and cross-entropy run fused
    over chunks of positions (models/losses.py): (positions, 50,257) logits never exist whole."""

    def __init__(self, gpt2):
        super().__init__()
        self.gpt2 = gpt2

    def forward(self, blocks):
        d = self.gpt2.config.n_embd
        hidden = self.gpt2.transformer(blocks, use_cache=False).last_hidden_state[:, :-1].reshape(-1, d)
        targets = blocks[:, 1:].reshape(-1)
        # keep=True: the softmax of every chunk waits for backward (no recomputed logits; memory
        # is plenty when pretraining a small model), one matrix product fewer per chunk.
        total = linear_cross_entropy(hidden, self.gpt2.lm_head.weight, targets, keep=True)
        return total, torch.tensor(len(targets), device=blocks.device)


# --- checkpoints -----------------------------------------------------------------------------
def model_tensors(model):
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
            if k != "lm_head.weight"}


def write_checkpoint(output_dir, model, optimizer, engine_state, stream, metrics, args):
    """<output_dir>/checkpoint/: weights, optimizer, stream and random states. Written as a
    .partial folder, flushed, then swapped in: a checkpoint/ folder is always complete."""
    from engines.run_state import optimizer_state, random_states, sync_folder
    final = os.path.join(output_dir, CHECKPOINT_DIR)
    partial = os.path.join(output_dir, f".{CHECKPOINT_DIR}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    save_file(model_tensors(model), os.path.join(partial, WEIGHTS), metadata={"format": "pt"})
    optimizer_json, tensors = optimizer_state(optimizer)
    random_json, random_tensors = random_states()
    stream_json, stream_tensors = stream.state()
    tensors.update(random_tensors)
    tensors.update(stream_tensors)
    save_file(tensors, os.path.join(partial, STATE_TENSORS), metadata={"format": "pt"})
    state = {"engine": engine_state, "optimizer": optimizer_json, "random": random_json,
             "stream": stream_json, "metrics": metrics,
             "settings": {name: getattr(args, name) for name in RESUME_SETTINGS}}
    write_json(os.path.join(partial, STATE_JSON), state)  # last: its presence marks a complete folder
    sync_folder(partial)
    if os.path.isdir(final):
        stale = os.path.join(output_dir, f".{CHECKPOINT_DIR}.stale")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale)
    else:
        os.replace(partial, final)
    sync_folder(output_dir, files=False)


def read_checkpoint(output_dir):
    """(state, tensors, weights) of <output_dir>/checkpoint/; damaged files are one VLMError."""
    folder = os.path.join(output_dir, CHECKPOINT_DIR)
    files = {name: os.path.join(folder, name) for name in (STATE_JSON, STATE_TENSORS, WEIGHTS)}
    try:
        with open(files[STATE_JSON], encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as error:
        raise VLMError(f"{files[STATE_JSON]}: unreadable training state ({error})") from None
    loaded = []
    for name in (STATE_TENSORS, WEIGHTS):
        try:
            loaded.append(load_file(files[name]))
        except (OSError, SafetensorError, ValueError) as error:
            raise VLMError(f"{files[name]}: corrupted or truncated safetensors file ({error})") from None
    return state, loaded[0], loaded[1]


def check_resume_settings(state, args, where):
    for name in RESUME_SETTINGS:
        saved, now = state["settings"].get(name, LATER_SETTINGS.get(name)), getattr(args, name)
        if saved != now:
            raise VLMError(f"--resume: {where} was started with --{name} {saved}, not {now}; "
                           f"resume with the run's own flags")


# --- the run ---------------------------------------------------------------------------------
@dataclass
class PretrainResult:
    model: GPT2LMHeadModel
    output_dir: str
    metrics: list


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_pretraining(args):
    """Pretrain as pretrain.py's flags say (also under torchrun); returns a PretrainResult."""
    from engines.runtime import run_distributed
    check_args(args)
    if not args.device:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype != "float32" and not args.device.startswith("cuda"):
        logger.warning("--dtype %s on %s: autocast on a CPU without native %s support is slow", args.dtype,
                       args.device, args.dtype)
    return run_distributed(args.device, False, lambda device: _run(args, device))


def _run(args, device):
    from engines.steps import clipped_step
    world, rank = idist.get_world_size(), idist.get_rank()
    main = rank == 0
    start_time = time.time()
    tokenizer = load_tokenizer()
    stream = BlockStream(args.train_files, tokenizer, args.block_size, seed=args.seed,
                         shuffle_blocks=args.shuffle_blocks, blank_line_documents=args.blank_line_documents)
    if args.copy_fraction > 0:
        stream = CopyMix(stream, args.copy_fraction, random_share=args.copy_random_share, seed=args.seed)
    valid = {os.path.basename(p).split(".")[0]: validation_blocks(p, tokenizer, args.block_size,
                                                                  args.valid_tokens)
             for p in args.valid_files}
    model = build_model(args)
    resume = None
    if args.resume:
        state, tensors, weights = read_checkpoint(args.output_dir)
        check_resume_settings(state, args, os.path.join(args.output_dir, CHECKPOINT_DIR))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if [k for k in missing if k != "lm_head.weight"] or unexpected:
            raise VLMError(f"{args.output_dir}/{CHECKPOINT_DIR}: weights do not fit the model")
        model.tie_weights()
        stream.restore(state["stream"], tensors, os.path.join(args.output_dir, CHECKPOINT_DIR))
        resume = (state, tensors)
    model.to(device)
    model.train()
    loss_module = CausalLMLoss(model)
    train_model = loss_module
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr,
                                  betas=(args.beta1, args.beta2), weight_decay=args.weight_decay)
    dtype = autocast_dtype(args.dtype)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = args.batch_size * (args.block_size - 1) * args.gradient_accumulation_steps * world
    if main:
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(os.path.join(args.output_dir, "pretrain_args.json"), dict(sorted(vars(args).items())))
        logger.info("GPT-2 %d layers x %d wide, %d heads, %d positions: %s parameters; "
                    "%s predicted tokens a step "
                    "(%d x %d blocks x %d accumulation x %d processes); %s", model.config.n_layer,
                    model.config.n_embd, model.config.n_head, model.config.n_positions, f"{n_params:,}",
                    f"{tokens_per_step:,}", args.batch_size, args.block_size,
                    args.gradient_accumulation_steps, world, device)
        logger.info("validation: %s", ", ".join(f"{name} {len(b) * args.block_size:,} tokens"
                                                 for name, b in valid.items()))

    accumulation = args.gradient_accumulation_steps
    record = {"loss_sum": 0.0, "loss_count": 0, "last_log": time.time(), "window_start": time.time(),
              "window_tokens": 0}

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def next_batch():
        """This process's micro-batch: each process takes its own slice of world x batch blocks."""
        blocks = [next(stream) for _ in range(args.batch_size * world)]
        mine = blocks[rank * args.batch_size:(rank + 1) * args.batch_size]
        return torch.tensor(mine, dtype=torch.long)

    def update(engine, batch):
        micro = (engine.state.iteration - 1) % accumulation        # 0 .. accumulation-1
        step = (engine.state.iteration - 1) // accumulation         # optimizer step being built
        if micro == 0:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
        batch = batch.to(device, non_blocking=True)
        sync = micro == accumulation - 1 or world == 1
        context = contextlib.nullcontext() if sync else train_model.no_sync()
        with context:
            with autocast():
                total, count = train_model(batch)
            loss = total / count
            value = loss.item()
            if not math.isfinite(value):
                raise VLMError(f"training loss is {value} at optimizer step {step + 1}: training stopped; "
                               f"last checkpoint: {os.path.join(args.output_dir, CHECKPOINT_DIR)}")
            scaled = loss / accumulation
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        record["loss_sum"] += value
        record["loss_count"] += 1
        if micro == accumulation - 1:
            norm = clipped_step(optimizer, model.parameters(), args.max_norm, scaler)
            engine.state.grad_norm = float(norm)
        return value

    trainer = Engine(update)
    metrics_log = []
    if resume is not None:
        state, tensors = resume
        from engines.run_state import restore_optimizer, restore_random_states
        restore_optimizer(optimizer, state["optimizer"], tensors,
                          os.path.join(args.output_dir, CHECKPOINT_DIR))
        if scaler is not None and state["engine"].get("grad_scaler"):
            scaler.load_state_dict(state["engine"]["grad_scaler"])
        metrics_log = list(state["metrics"])
    writer = _tensorboard(args.output_dir) if main else None

    @torch.no_grad()
    def validate():
        model.eval()
        results = {}
        for name, blocks in valid.items():
            total = torch.zeros((), dtype=torch.float64, device=device)
            count = torch.zeros((), dtype=torch.float64, device=device)
            for start in range(rank * args.batch_size, len(blocks), args.batch_size * world):
                piece = blocks[start:start + args.batch_size].to(device)
                with autocast():
                    nll, n = loss_module(piece)
                total += nll.double()
                count += n
            if world > 1:
                total, count = idist.all_reduce(total), idist.all_reduce(count)
            nll = (total / count).item()
            results[name] = {"nll": nll, "ppl": math.exp(min(nll, 700.0))}
        model.train()
        return results

    def evaluate_and_save(engine):
        step = engine.state.iteration // accumulation
        if record.get("validated") == step:
            return  # already validated at this step (the last interval ended exactly at max_steps)
        record["validated"] = step  # on every process, so all of them take part in the same all-reduces
        results = validate()
        if not main:
            return
        elapsed = time.time() - start_time
        train_loss = record["loss_sum"] / max(record["loss_count"], 1)
        entry = {"step": step, "tokens": step * tokens_per_step, "train_loss": train_loss,
                 "lr": optimizer.param_groups[0]["lr"], "valid": results, "copy": copy_record(model),
                 "elapsed": round(_total_elapsed(resume, elapsed), 1),
                 "tokens_per_s": round(record["window_tokens"]
                                       / max(time.time() - record["window_start"], 1e-9), 1),
                 "peak_rss_mb": round(peak_rss_mb(), 1)}
        metrics_log.append(entry)
        record.update(loss_sum=0.0, loss_count=0, window_start=time.time(), window_tokens=0)
        write_text(os.path.join(args.output_dir, METRICS_FILE),
                   "".join(json.dumps(r, allow_nan=False) + "\n" for r in metrics_log))
        if writer is not None:
            writer.add_scalar("train/loss", train_loss, step)
            writer.add_scalar("train/lr", entry["lr"], step)
            writer.add_scalar("copy/repeat_nll", entry["copy"]["repeat"], step)
            for name, r in results.items():
                writer.add_scalar(f"valid/{name}/nll", r["nll"], step)
                writer.add_scalar(f"valid/{name}/ppl", r["ppl"], step)
            writer.flush()
        engine_state = {"iteration": engine.state.iteration, "epoch": engine.state.epoch,
                        "grad_scaler": dict(scaler.state_dict()) if scaler is not None else None}
        write_checkpoint(args.output_dir, model, optimizer, engine_state, stream, metrics_log, args)
        logger.info("step %d/%d (%s tokens): train loss %.4f, %s, copy loss %.3f (first pass %.3f); "
                    "%.0f tokens/s, peak RSS %.0f MB", step, args.max_steps, f"{entry['tokens']:,}",
                    train_loss, ", ".join(f"{n} ppl {r['ppl']:.2f}" for n, r in results.items()),
                    entry["copy"]["repeat"], entry["copy"]["first"], entry["tokens_per_s"],
                    entry["peak_rss_mb"])

    def progress(engine):
        record["window_tokens"] += args.batch_size * (args.block_size - 1) * world
        now = time.time()
        if main and now - record["last_log"] >= args.log_every:
            record["last_log"] = now
            step = engine.state.iteration / accumulation
            rate = record["window_tokens"] / max(now - record["window_start"], 1e-9)
            left = (args.max_steps - step) * tokens_per_step / max(rate, 1e-9)
            logger.info("step %.0f/%d: loss %.4f, lr %.2e, %.0f tokens/s, %.0f min left", step,
                        args.max_steps, record["loss_sum"] / max(record["loss_count"], 1),
                        optimizer.param_groups[0]["lr"], rate, left / 60)

    trainer.add_event_handler(Events.ITERATION_COMPLETED, progress)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, evaluate_and_save)
    trainer.add_event_handler(Events.COMPLETED, evaluate_and_save)

    total_iterations = args.max_steps * accumulation
    epoch_length = args.eval_interval * accumulation
    if resume is not None:
        done = resume[0]["engine"]["iteration"]
        trainer.load_state_dict({"iteration": done, "epoch_length": epoch_length,
                                 "max_iters": total_iterations})
        restore_random_states(resume[0]["random"], resume[1])
        if main:
            logger.info("resuming %s at step %d", args.output_dir, done // accumulation)

    def batches():
        while True:
            yield next_batch()

    try:
        if resume is None or resume[0]["engine"]["iteration"] < total_iterations:
            # max_iters, not whole epochs: a --max_steps that --eval_interval does not divide ends
            # there (validated and saved on COMPLETED), not at the next multiple of the interval
            trainer.run(batches(), max_iters=total_iterations, epoch_length=epoch_length)
    finally:
        if writer is not None:
            writer.close()
    if main:
        save_model_folder(model, tokenizer, args, metrics_log)
        logger.info("model saved to %s", args.output_dir)
    return PretrainResult(model, args.output_dir, metrics_log)


def copy_record(model):
    """The repeated-random-sequence test (models/copy_test.py) of the model now, for the curve."""
    length = min(50, model.config.n_positions // 2)  # 50 tokens shown twice, on a model with room for them
    result = copy_losses(model, length=length)
    return {"first": round(result["first"], 4), "repeat": round(result["repeat"], 4)}


def _total_elapsed(resume, elapsed):
    """Wall seconds of the whole run: earlier processes' time (a resumed run) plus this one's."""
    if resume is None or not resume[0]["metrics"]:
        return elapsed
    return resume[0]["metrics"][-1]["elapsed"] + elapsed


def _tensorboard(output_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("tensorboard is not installed: no TensorBoard logs (metrics.jsonl has the numbers)")
        return None
    return SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"))
