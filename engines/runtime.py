"""Where and how a run executes: devices, seeds, logging and the torchrun process group."""
import contextlib
import logging
import os
import random

import ignite.distributed as idist
import torch

from utils.errors import VLMError


def resolve_device(name, fp16=False, local_rank=None):
    """torch.device for --device; with several processes on CUDA each takes cuda:<local rank>."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise VLMError(f"--device {name}: not a device name (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise VLMError(f"--device {name}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VLMError(f"--device {name}: CUDA is not available on this machine")
        if local_rank is not None:
            device = torch.device("cuda", local_rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise VLMError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if fp16 and device.type != "cuda":
        raise VLMError("--fp16 needs a CUDA device")
    return device


def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy
        numpy.random.seed(seed % 2 ** 32)


def distributed_world():
    """World size from the launcher's environment (torchrun sets WORLD_SIZE)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise VLMError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def run_distributed(device_name, fp16, body):
    """body(device) in this process or, launched by torchrun (WORLD_SIZE > 1), inside the process
    group (gloo on CPU, nccl on CUDA; each process on cuda:<local rank>); returns body's result."""
    if distributed_world() <= 1:
        return body(resolve_device(device_name, fp16))
    device = resolve_device(device_name, fp16, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if idist.get_world_size() > 1:  # the caller already joined the process group
        return body(device)
    idist.initialize("nccl" if device.type == "cuda" else "gloo")
    try:
        result = body(device)
        idist.barrier()  # rank 0 has written its files before anyone leaves
        return result
    finally:
        idist.finalize()


def configure_logging():
    """Info on the main process only; ignite's chatter, and its ERROR echo of exceptions that are
    reported anyway (one `error:` line for user errors such as a NaN loss), kept quiet."""
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    logging.getLogger("ignite").setLevel(logging.WARNING)
    logging.getLogger("ignite.engine.engine.Engine").setLevel(logging.CRITICAL)


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
