"""The ignite engines of training and validation: the trainer's update (accumulation, clipping,
float16 scaling), the exact token-level NLL metric, and the authors' learning-rate schedule.

The trainer follows the authors' train.py: AdamW (no weight decay) over the trainable parameters,
the learning rate falling linearly from --lr to 0 over all iterations, the loss divided by the
accumulation steps, gradients clipped to --max_norm, a step every --gradient_accumulation_steps
iterations. Validation is the exact token-level mean NLL over the whole validation split."""
import contextlib
import math

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import PiecewiseLinear
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from engines.runtime import unwrap
from utils.errors import VLMError


def _autocast(device, enabled):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16)


def _model_inputs(batch, device, use_task_ids):
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    task_ids = batch["task_ids"] if use_task_ids else None
    batch.setdefault("virtual_ids", None)  # only batches of prompt / p-tuning tasks have them
    return batch, task_ids


class NonFiniteLoss(VLMError):
    """A NaN or infinite training loss: training stops (exit 2 through exit_on_user_error)."""


def clipped_step(optimizer, parameters, max_norm, scaler=None):
    """One optimizer step: gradients unscaled (fp16), clipped to max_norm, stepped, zeroed.
    Returns the gradient norm before clipping (also what pretrain.py logs)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def create_trainer(model, optimizer, parameters, device, gradient_accumulation_steps=1, max_norm=1.0,
                   fp16=False, use_task_ids=True):
    """Engine whose output is the batch's mean token loss (before division by the accumulation).

    A step is taken after every `gradient_accumulation_steps` iterations of an epoch and, at the
    end of an epoch, for a pending remainder (its gradient rescaled to the mean of its batches).
    Gradients are clipped once per step, just before it."""
    parameters = [p for p in parameters if p.requires_grad]
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    accumulation = {"pending": 0}

    def step():
        pending = accumulation["pending"]
        if pending == 0:
            return
        if pending < gradient_accumulation_steps:
            for p in parameters:
                if p.grad is not None:
                    p.grad.mul_(gradient_accumulation_steps / pending)
        clipped_step(optimizer, parameters, max_norm, scaler)
        accumulation["pending"] = 0

    def update(engine, batch):
        model.train()
        batch, task_ids = _model_inputs(batch, device, use_task_ids)
        with _autocast(device, fp16):
            extra = {} if batch["virtual_ids"] is None else {"virtual_ids": batch["virtual_ids"]}
            loss = model(batch["input_ids"], token_type_ids=batch["token_type_ids"], task_ids=task_ids,
                         labels=batch["labels"], **extra).loss
        value = loss.item()
        if not math.isfinite(value):  # stop before the bad gradient reaches any weight or checkpoint
            raise NonFiniteLoss(f"training loss is {value} at epoch {engine.state.epoch}, "
                                f"iteration {engine.state.iteration}")
        scaled = loss / gradient_accumulation_steps
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        accumulation["pending"] += 1
        if accumulation["pending"] == gradient_accumulation_steps:
            step()
        return value

    trainer = Engine(update)
    trainer.grad_scaler = scaler  # saved and restored with the training state
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: step())  # flush a remainder
    return trainer


def token_nll_sums(model, batch, device, use_task_ids=True, fp16=False):
    """(sum of the NLL of every label token, number of label tokens) for one batch."""
    batch, task_ids = _model_inputs(batch, device, use_task_ids)
    with torch.no_grad(), _autocast(device, fp16):
        logits, targets = unwrap(model).labelled_logits(batch["input_ids"], batch["labels"],
                                                        batch["token_type_ids"], task_ids,
                                                        virtual_ids=batch["virtual_ids"])
    nll = F.cross_entropy(logits.float(), targets, reduction="sum")
    return nll.double(), torch.tensor(targets.numel(), device=nll.device)


class TokenNLL(Metric):
    """Exact token-level mean NLL: summed over all label tokens (all processes), then divided."""

    @reinit__is_reduced
    def reset(self):
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = torch.tensor(0, dtype=torch.long, device=self._device)

    @reinit__is_reduced
    def update(self, output):
        nll_sum, count = output
        self._sum += nll_sum.detach().to(self._device)
        self._count += count.detach().to(self._device)

    @sync_all_reduce("_sum", "_count")
    def compute(self):
        if self._count.item() == 0:
            raise VLMError("validation has no label tokens")
        return (self._sum / self._count).item()


def perplexity(nll):
    try:
        return math.exp(nll)
    except OverflowError:
        return float("inf")


def create_evaluator(model, device, fp16=False, use_task_ids=True):
    """Engine over the validation loader; state.metrics: nll (token mean), ppl = exp(nll)."""
    def inference(engine, batch):
        model.eval()
        return token_nll_sums(model, batch, device, use_task_ids, fp16)

    evaluator = Engine(inference)
    TokenNLL(device=device).attach(evaluator, "nll")
    evaluator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.__setitem__(
        "ppl", perplexity(e.state.metrics["nll"])))
    return evaluator


def attach_lr_schedule(trainer, optimizer, lr, total_iterations):
    """lr from `lr` at the first iteration down to 0 at `total_iterations` (the authors' schedule).
    A parameter group with an `lr_scale` (poly's routers: their own rate) follows it at that scale."""
    if total_iterations <= 0:
        return None
    scheduler = PiecewiseLinear(optimizer, "lr", [(0, lr), (total_iterations, 0.0)])
    trainer.add_event_handler(Events.ITERATION_STARTED, scheduler)
    if any("lr_scale" in group for group in optimizer.param_groups):
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: _scale_lr(optimizer))
    return scheduler


def _scale_lr(optimizer):
    # After the scheduler, which gives every group the common rate; the groups are looked up each
    # time because loading an optimizer state (--resume) replaces them.
    for group in optimizer.param_groups:
        if "lr_scale" in group:
            group["lr"] *= group["lr_scale"]
