"""torch.distributed set-up for torchrun (NCCL on CUDA, gloo on CPU) and the few collectives we use."""
from __future__ import annotations

import datetime
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rela.errors import RelaError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


DEFAULT_TIMEOUT_S = 1800.0


def init_distributed(device_type: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Joins torchrun's process group when launched by it (WORLD_SIZE > 1); a no-op otherwise.

    timeout_s: how long a collective waits for the slowest rank before failing (--dist-timeout). torch's NCCL
    default is 600 s, shorter than a rank may wait for a bank that another run is building."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # torchrun's agent keeps one store across restarts (--max-restarts): a restarted group would read the
        # dead group's addresses (gloo: "connectFullMesh failed ... Connection refused"). A prefix per attempt.
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"rela/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        timeout = datetime.timedelta(seconds=timeout_s)
        if device_type == "cuda":  # bound to this rank's GPU: NCCL makes its communicators eagerly
            dist.init_process_group(backend="nccl", store=store, rank=rank, world_size=world_size,
                                    device_id=torch.device("cuda", local_rank), timeout=timeout)
        else:
            dist.init_process_group(backend="gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    return DistInfo(rank, world_size, local_rank)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In place; asynchronous on NCCL (no host sync). gloo has no AVG, so sum and divide."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_rows(tensor: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenates every rank's (n_r, ...) rows in rank order; counts[r] = n_r (ranks may differ)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts)])


def row_counts(num_rows: int, device: torch.device) -> list[int]:
    """Every rank's `num_rows`, in rank order (collective; one host sync); [num_rows] without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [num_rows]
    counts = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    counts[dist.get_rank()] = num_rows
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts.tolist()


def broadcast_rows_(out: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Fills rows [bounds[r], bounds[r + 1]) of `out` (contiguous, (N, ...)) with rank r's, for every rank r,
    in place: each rank has written its own rows there. Rank r broadcasts its slice straight into the others'
    slices, so no buffer is held beside `out` (all_gather_rows holds the rows twice more: its receive
    buffers and their concatenation). Collective; `out` as it is without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return out
    if not out.is_contiguous() or len(bounds) != dist.get_world_size() + 1:
        raise ValueError(f"broadcast_rows_ needs a contiguous tensor and world_size + 1 bounds, got "
                         f"contiguous={out.is_contiguous()} and {len(bounds)} bounds")
    for rank in range(dist.get_world_size()):
        if bounds[rank + 1] > bounds[rank]:  # every rank knows the bounds: all skip an empty share alike
            dist.broadcast(out[bounds[rank]: bounds[rank + 1]], src=rank)
    return out


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] without a process group."""
    if not info.enabled:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Rank src's `obj` (picklable) on every rank; `obj` itself without a process group."""
    if not info.enabled:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src)
    return box[0]


def check_shared_folder(folder: Path, what: str, info: DistInfo, wait_s: float = 10.0) -> None:
    """RelaError on every rank unless `folder` is one folder for every rank: rank 0 writes a probe file in it
    and every rank must read it back (for up to `wait_s`: NFS caches a folder's listing for a few seconds).
    A folder local to each node would let the nodes write and read different files (checkpoints, the bank)."""
    if not info.enabled:
        return
    folder = Path(folder)
    token, probe = secrets.token_hex(8), None
    error = None
    if info.is_main:
        probe = folder / f".shared-probe.tmp-{token}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_text(token)
        except OSError as err:
            error = f"cannot write {probe}: {err.strerror or err}"
    token, error = broadcast_object((token, error), info)
    if not info.is_main:
        probe, deadline = folder / f".shared-probe.tmp-{token}", time.monotonic() + wait_s
        while error is None:
            try:
                if probe.read_text() == token:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                error = (f"{what} {folder} is not shared by every node: rank {info.rank} on {socket.gethostname()} "
                         f"does not see the probe file rank 0 wrote there; put it on storage every node mounts")
            else:
                time.sleep(0.2)
    errors = gather_objects(error, info)
    if info.is_main and probe is not None:
        probe.unlink(missing_ok=True)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise RelaError(first)


def broadcast_flag(flag: bool, device: torch.device, src: int = 0) -> bool:
    """Rank src's `flag`, on every rank (a host sync); the flag itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src)
    return bool(value.item())


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_buffers_(module: torch.nn.Module, src: int = 0) -> None:
    """Makes every rank's buffers (BN running statistics) rank src's. DDP broadcasts them only at the
    start of a forward, so after the last step each rank holds the statistics of its own last batch."""
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of ranks; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's (B, ...) rows in rank order (equal B on every rank), differentiable: the gradient of
    each rank's rows flows back to that rank (the contrastive losses' negatives from every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(tensor))


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, differentiable (Barlow Twins' cross-correlation over the global batch)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(tensor)
