"""Data-parallel calibration on ``torch.distributed``: each rank calibrates its share of the batches, the
statistics are merged exactly on every rank.

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...)::

    torchrun --nproc-per-node 2 my_calibration.py          # CPU: the gloo backend
    torchrun --nproc-per-node 8 my_calibration.py          # one GPU per rank: NCCL

Rank ``r`` of ``W`` takes the calibration batches ``r, r + W, r + 2W, ...`` (:func:`share_of_samples`); after
its local pass every rank gathers all ranks'
:class:`~mone_export.stats.ExpertStats` and merges them in rank order (counts and sums add, means and M2 combine
by Chan et al.'s pairwise update), so every rank holds the same statistics, equal to a single-process run's to
float64 rounding (about 1e-14 relative), and makes the same plan.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Sequence

import torch

from mone_export.errors import UsageError
from mone_export.stats import ExpertStats, collect_stats

__all__ = ["FINISH_TIMEOUT_HOURS", "collect_stats_distributed", "finish", "init_from_environment",
           "is_distributed_launch", "is_primary", "share_of_samples"]

logger = logging.getLogger(__name__)

FINISH_TIMEOUT_HOURS = 12
"""How long a rank may wait for the others (rank 0 exports and validates alone) before the launch fails."""


def is_distributed_launch() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_primary() -> bool:
    """Whether this process writes outputs: rank 0 of a launch, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def init_from_environment(backend: str | None = None) -> None:
    """Join the process group ``torchrun`` describes in the environment (NCCL on CUDA, else gloo), once."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # The other ranks wait in finish() while rank 0 exports and validates: allow that to take hours.
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=FINISH_TIMEOUT_HOURS))
    logger.info("rank %d of %d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)


def share_of_samples(batches: list[torch.Tensor], rank: int, world: int) -> list[torch.Tensor]:
    """Rank ``rank``'s calibration batches: every ``world``-th batch from ``rank`` on, so each batch is computed
    exactly as a single process computes it (float32 kernels may round a row differently in another batch); with
    fewer batches than ranks, every ``world``-th sequence instead, in batches of the original size."""
    if len(batches) >= world:
        return batches[rank::world]
    samples = sum(int(b.shape[0]) for b in batches)
    if samples < world:
        raise UsageError(f"{samples} calibration samples cannot be shared by {world} ranks: use at least one "
                         "sample per rank (more --calib-samples or fewer processes).")
    rows = torch.cat(batches)[rank::world]
    return list(rows.split(int(batches[0].shape[0])))


def finish() -> None:
    """Leave the process group together: a rank that exits while its peers still hold their gloo connections
    can abort in the transport's destructor (seen as ``terminate called without an active exception``). Every rank
    waits for the others (rank 0 writing the output), then tears the group down. A no-op without a group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def collect_stats_distributed(model, batches: Sequence[torch.Tensor], progress: bool = True,
                              calibration: dict | None = None, group=None, measure_removal: bool = False
                              ) -> ExpertStats:
    """:func:`mone_export.collect_stats` over the ranks of ``group`` (default: the whole world); every rank returns
    the merged statistics.

    ``model`` is an in-memory model or a :class:`~mone_export.streaming.LayerStreamedModel` (each rank then
    streams its layers on its own). Every rank must pass the same ``batches``.
    """
    import torch.distributed as dist

    from mone_export.streaming import LayerStreamedModel, collect_stats_streamed

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = share_of_samples(list(batches), rank, world)
    collect = collect_stats_streamed if isinstance(model, LayerStreamedModel) else collect_stats
    local = collect(model, mine, progress=progress and rank == 0, calibration=dict(calibration or {}, tokens=sum(
        int(b.numel()) for b in mine)), measure_removal=measure_removal)
    gathered: list[ExpertStats | None] = [None] * world
    dist.all_gather_object(gathered, local, group=group)
    merged = gathered[0]
    for other in gathered[1:]:
        merged.merge(other)
    logger.info("merged expert statistics of %d ranks (%d tokens)", world, merged.calibration.get("tokens", 0))
    return merged
