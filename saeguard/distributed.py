"""Data-parallel work under ``torchrun``, through PyTorch's own ``torch.distributed``.

``torchrun --nproc-per-node N -m saeguard train ...`` starts N copies of a command; each reads
``RANK``/``WORLD_SIZE`` from its environment and joins one process group (gloo on the CPU, nccl on
GPUs, chosen from the device). :class:`World` is what the jobs see of it: this process's rank, the
number of ranks and the few collectives they use. Run as one plain process, a command gets the
single-rank world, whose collectives do nothing, so every job has one code path.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from saeguard.errors import SaeguardError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI starts without it
    import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT_MINUTES = 60
"""How long a rank waits for the others at a collective before the job fails (a rank that stays
behind evaluating, or one that hangs)."""


def launched_world_size() -> int:
    """How many processes torchrun started for this job (1 when run as one plain process)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def is_main_process() -> bool:
    """Whether this process reports (rank 0 under torchrun, or the only process)."""
    return os.environ.get("RANK", "0") == "0"


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one job, and their collectives."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: _cpu())
    """Where collectives exchange tensors (the GPU with nccl, the CPU with gloo)."""

    @property
    def is_main(self) -> bool:
        """Rank 0 writes every file of the job; the other ranks only compute."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def describe(self) -> dict[str, Any]:
        """What outputs record of the world that made them."""
        return {"world_size": self.size}

    # --- collectives (no-ops in a single-rank world) ----------------------------------------
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks in place (every rank gets the same result)."""
        return self._all_reduce_(tensor, "SUM")

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over the ranks, in place."""
        return self._all_reduce_(tensor, "MAX")

    def _all_reduce_(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if self.distributed:
            import torch.distributed as dist

            moved = tensor.to(self.device)
            dist.all_reduce(moved, op=getattr(dist.ReduceOp, op))
            if moved is not tensor:
                tensor.copy_(moved)
        return tensor

    def broadcast_tensor(
        self, tensor: torch.Tensor | None, src: int, shape_dtype: Any = None
    ) -> torch.Tensor:
        """``tensor`` of rank ``src`` on every rank (the others pass None): its shape travels
        first, so receivers need not know it."""
        if not self.distributed:
            assert tensor is not None
            return tensor
        import torch
        import torch.distributed as dist

        dtype = tensor.dtype if tensor is not None else shape_dtype
        header = torch.zeros(8, dtype=torch.long, device=self.device)
        if self.rank == src:
            assert tensor is not None
            header[0] = tensor.ndim
            header[1 : 1 + tensor.ndim] = torch.tensor(tensor.shape)
        dist.broadcast(header, src)
        shape = tuple(int(v) for v in header[1 : 1 + int(header[0])])
        if self.rank == src:
            assert tensor is not None
            data = tensor.to(self.device).contiguous()
        else:
            data = torch.empty(shape, dtype=dtype, device=self.device)
        dist.broadcast(data, src)
        return data if tensor is None else tensor

    def gather_json(self, value: Any) -> list[Any]:
        """Every rank's JSON-able ``value``, in rank order, on every rank (sent as UTF-8 JSON,
        never pickled)."""
        if not self.distributed:
            return [value]
        import torch
        import torch.distributed as dist

        payload = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)
        size = torch.tensor([len(payload)], dtype=torch.long, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.size)]
        dist.all_gather(sizes, size)
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[: len(payload)] = payload.to(self.device)
        parts = [torch.zeros_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return [
            json.loads(bytes(part[: int(n)].cpu().tolist()).decode())
            for part, n in zip(parts, sizes, strict=True)
        ]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def on_main(self, work: Callable[[], T]) -> T | None:
        """Run ``work`` on rank 0 only; the other ranks wait for it and fail in one line with its
        error when it fails, instead of hanging at their next collective."""
        if not self.distributed:
            return work()
        result: T | None = None
        error = ""
        if self.is_main:
            try:
                result = work()
            except SaeguardError as exc:
                error = str(exc) or type(exc).__name__
                self.gather_json(error)
                raise
            except BaseException as exc:
                self.gather_json(f"{type(exc).__name__}: {exc}")
                raise
        errors = self.gather_json(error)
        if errors[0] and not self.is_main:
            raise SaeguardError(f"rank 0 failed: {errors[0]}")
        return result

    def replicate(self, chunks: Iterable[torch.Tensor | None]) -> Iterator[torch.Tensor]:
        """Every rank's view of one chunk stream whose chunks are computed by their owners.

        ``chunks`` yields, in the same global order on every rank, the chunks this rank owns
        (chunk ``i`` belongs to rank ``i % size``) and None for the others'; each chunk is
        broadcast by its owner, so every rank sees the whole stream while each model forward
        or shard read happens once. Empty chunks are passed over.
        """
        import torch

        for index, chunk in enumerate(chunks):
            owner = index % self.size
            if owner == self.rank and chunk is None:
                raise RuntimeError(f"rank {self.rank} owns chunk {index} but yielded none")
            if not self.distributed:
                assert chunk is not None
                if len(chunk):
                    yield chunk
                continue
            data = self.broadcast_tensor(chunk if owner == self.rank else None, owner,
                                         shape_dtype=torch.float32)  # fmt: skip
            if len(data):
                yield data.to("cpu") if data.device.type != "cpu" else data

    def owns(self, index: int) -> bool:
        """Whether work item ``index`` (a chunk, a shard, a text) is this rank's."""
        return index % self.size == self.rank


def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


_WORLD: World | None = None


def join_world(device: torch.device) -> World:
    """This process's world: under torchrun, join the job's process group (once per process;
    gloo for CPU work, nccl for CUDA); as one plain process, the single-rank world."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = launched_world_size()
    if size == 1:
        _WORLD = World()
        return _WORLD
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise SaeguardError("this torch build has no torch.distributed: run as one process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=TIMEOUT_MINUTES))
    rank = dist.get_rank()
    _WORLD = World(rank=rank, size=dist.get_world_size(),
                   device=device if backend == "nccl" else torch.device("cpu"))  # fmt: skip
    log.info("rank %d of %d joined (%s)", rank, _WORLD.size, backend)
    return _WORLD


def part_ways(world: World) -> World:
    """End the ranks' work together: wait for each other and tear the process group down; each
    process goes on alone (rank 0 with what only it does: evaluation, reports), so no rank waits
    at a collective for the others' single-process work."""
    global _WORLD
    if not world.distributed:
        return world
    import torch.distributed as dist

    if dist.is_initialized():  # (a sub-job may have parted already)
        dist.barrier()
        dist.destroy_process_group()
    _WORLD = World(rank=world.rank, size=1, device=world.device)
    return _WORLD


def leave_world(finished: bool = True) -> None:
    """Tear the process group down at the end of a command (no-op as one process).

    After a command that finished, the ranks first wait for each other, so none tears its side
    down while another still works (rank 0 evaluating, say): a rank that left early made gloo
    abort at exit in 2 of 36 runs here. After a failure nobody waits: the others may be
    gone, and torchrun ends the job anyway.
    """
    global _WORLD
    _WORLD = None
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return
    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()
