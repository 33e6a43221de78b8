"""Distributed glue over torch.distributed: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK, we pick
NCCL on GPUs and gloo on CPUs, wrap the model in DistributedDataParallel and sum metrics.

Nothing here is home-made communication: the process group, DDP and the collectives are
PyTorch's. What this module adds is the policy: a timeout so that a dead or stuck rank stops
the run instead of hanging it, one-line errors that say which rank failed, and a checkpoint
guard so a run is resumed with the number of processes it was started with."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from microtrain.errors import CheckpointError, MicrotrainError
from microtrain.hookspecs import hookimpl

DEFAULT_TIMEOUT_SECONDS = 300


def timeout() -> datetime.timedelta:
    """How long a collective may wait for the other ranks (MICROTRAIN_DIST_TIMEOUT, seconds)."""
    raw = os.environ.get("MICROTRAIN_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_SECONDS))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise MicrotrainError(f"MICROTRAIN_DIST_TIMEOUT='{raw}' is not a positive number of seconds; set it to e.g. 300")
    return datetime.timedelta(seconds=seconds)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device_name: str) -> None:
    """Join the process group when launched by torchrun with more than one process."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 2 or dist.is_initialized():
        return
    if not dist.is_available():
        raise MicrotrainError("this PyTorch build has no torch.distributed; run without torchrun or install a full PyTorch")
    if device_name.startswith("cuda:"):
        raise MicrotrainError(f"device={device_name} would put every rank on the same GPU; under torchrun use device=cuda "
                              "or device=auto (each rank takes the GPU of its LOCAL_RANK)")
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        if local_rank() >= torch.cuda.device_count():
            raise MicrotrainError(f"LOCAL_RANK {local_rank()} but this host has {torch.cuda.device_count()} GPUs; "
                                  "start at most that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local_rank())
    backend = "nccl" if use_cuda else "gloo"
    try:
        dist.init_process_group(backend=backend, timeout=timeout())
    except (RuntimeError, ValueError) as exc:  # DistStoreError, DistNetworkError, a missing backend
        raise MicrotrainError(
            f"rank {os.environ['RANK']} could not join the {backend} process group of {os.environ['WORLD_SIZE']} "
            f"processes ({_first_line(exc)}); check that every node was started with the same --nnodes and "
            "--rdzv-endpoint and can reach it"
        ) from None


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def wrap_model(model: torch.nn.Module, device: torch.device, sync_batchnorm: bool) -> torch.nn.Module:
    """DDP with its defaults: parameters broadcast from rank 0 once, gradients averaged every
    step, buffers (BatchNorm running statistics) broadcast from rank 0 before every training
    forward. SyncBatchNorm only on GPUs: PyTorch's runs on accelerators only."""
    from torch.nn.parallel import DistributedDataParallel

    if sync_batchnorm and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif sync_batchnorm and rank() == 0:
        print(f"microtrain: sync_batchnorm has no effect on {device.type} (PyTorch's SyncBatchNorm needs GPUs): each "
              "process normalises with the statistics of its own batch", file=sys.stderr)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a no-op in a single process)."""
    if not is_active():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on one: all ranks must take the same branch."""
    if not is_active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before evaluation.

    Each rank updates its running statistics from its own batches during training, so without
    this the ranks would evaluate slightly different models; with it, the reduced test metrics
    are exactly those of the model rank 0 checkpoints. (DDP does the same on its first forward
    after training, but an evaluation model a plugin supplies is not wrapped in DDP.)"""
    if not is_active():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def barrier() -> None:
    if is_active():
        dist.barrier()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def is_communication_error(error: BaseException) -> bool:
    """A failed or timed-out collective: the cause is usually on another rank."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "ProcessGroup")
    )


def failure_message(error: BaseException) -> str:
    """One line for status.json and the terminal; a communication failure says where to look."""
    if isinstance(error, MicrotrainError):
        return str(error)
    if is_active() and is_communication_error(error):
        return (f"lost contact with another rank: it failed (its own error is printed by that rank and in torchrun's "
                f"summary) or did not answer within MICROTRAIN_DIST_TIMEOUT={timeout().total_seconds():g}s "
                f"({type(error).__name__}: {_first_line(error)}); resume with --resume RUN_DIR")
    return f"{type(error).__name__}: {error}"


def tag_error(error: MicrotrainError) -> MicrotrainError:
    """Prefix the error with 'rank R of N' in a distributed run, and hand it to torchrun.

    torchrun prints every failed rank's error file in its summary; a rank whose own error
    (not a lost connection) stopped the run writes one, so the summary shows the real cause."""
    if world_size() < 2:
        return error
    cause = error.__cause__ or error.__context__
    message = f"rank {rank()} of {world_size()}: {error}"
    error.args = (message,)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path and not (cause is not None and is_communication_error(cause)):
        try:
            with open(path, "w") as handle:
                json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                          "timestamp": str(int(time.time()))}}}, handle)
        except OSError:
            pass  # only a diagnostic: the error is printed on stderr anyway
    return error


class ResumeGuard:
    """Records the number of processes in each checkpoint and refuses a resume with another.

    The shards, the steps per epoch and so the learning-rate schedule depend on the world size;
    resuming with a different one would silently train a different schedule."""

    name = "microtrain.distributed"

    @hookimpl
    def on_checkpoint_save(self, state, checkpoint):
        checkpoint["plugins"][self.name] = {"world_size": state.world_size}

    @hookimpl
    def on_checkpoint_load(self, state, checkpoint):
        saved = int(checkpoint.get("plugins", {}).get(self.name, {}).get("world_size", 1))
        if saved != state.world_size:
            raise CheckpointError(
                f"the checkpoint was written by a run of {saved} process(es), this run has {state.world_size}; the batch "
                f"order, steps per epoch and learning-rate schedule depend on it: resume with {saved} process(es) "
                f"(torchrun --nnodes x --nproc_per_node = {saved})"
            )
