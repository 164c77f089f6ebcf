"""One recipe on N processes: start them through torch's own launcher, and decide who does what once they run.

`tunelab train RECIPE --nproc N` hands the job to `torch.distributed.run` (torchrun's engine: rendezvous,
environment, restarts, error files); `torchrun … -m tunelab train …` reaches the same code, because a process
learns its place only from the launcher's environment (WORLD_SIZE, RANK, LOCAL_RANK). From there:

- rank 0 validates, creates the run folder and writes every file; the other ranks write nothing and print nothing;
- `train.batch_size` means the same on any number of processes: rows per micro-batch across all of them, split
  evenly (a split that does not divide is refused before anything starts);
- tunelab's own scoring loops shard their rows in contiguous blocks and gather them back in order, so the
  figures are those of one process on the same rows (no padded duplicates at the end);
- a failing rank records its error in the file the launcher names (TORCHELASTIC_ERROR_FILE), and the launcher
  prints that one line instead of a traceback per process.

No process group or launcher of tunelab's own: the group is torch's, set up from the launcher's environment,
and the Trainer (through accelerate) joins the same group.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunelab.errors import TunelabError
from tunelab.tasks import tasks_that

if TYPE_CHECKING:
    from tunelab.recipe import Recipe

LAUNCHED_BY_TUNELAB = "TUNELAB_LAUNCHED"  # set by `tunelab train --nproc` for the processes it starts


@dataclass(frozen=True)
class World:
    """Where this process stands: how many processes train together and which one this is."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that validates, prints and writes the run folder."""
        return self.rank == 0


def current_world() -> World:
    """This process's place, from the environment torchrun (or accelerate, Slurm's srun torchrun) sets."""
    return World(size=int(os.environ.get("WORLD_SIZE", "1")), rank=int(os.environ.get("RANK", "0")),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    """Whether this process writes the run folder and prints (always true on one process)."""
    return current_world().is_main


def per_process_batch(batch_size: int, grad_accum: int, world_size: int) -> int:
    """Rows each process takes per micro-batch, so that every optimizer step sees batch_size × grad_accum rows
    whatever the number of processes; refuse a batch that does not split evenly."""
    if batch_size % world_size:
        lower, upper = batch_size // world_size * world_size, (batch_size // world_size + 1) * world_size
        fixes = f"train.batch_size={upper}" if lower == 0 else f"train.batch_size={lower} or {upper}"
        raise TunelabError(f"train.batch_size {batch_size} does not split over {world_size} processes "
                           f"({batch_size}/{world_size} is not whole; global batch {batch_size} × grad_accum "
                           f"{grad_accum}); use {fixes}, or a process count that divides {batch_size}")
    return batch_size // world_size


def join(world: World, strategy: str = "ddp") -> None:
    """Join torch's process group (gloo on CPU, NCCL on CUDA) from the launcher's environment, once (and
    DeepSpeed's layer over it for strategy deepspeed); rank > 0 goes quiet so that the console shows one run's
    story."""
    if world.size == 1:
        return
    import torch
    import torch.distributed as dist

    from tunelab.console import set_quiet

    if not world.is_main:
        set_quiet(True)
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", world.local_rank))
    else:
        dist.init_process_group("gloo")
    if strategy == "deepspeed":
        from tunelab.sharding import join_deepspeed

        join_deepspeed()


def backend() -> str:
    """The DDP backend for the Trainer: gloo on CPU, nccl on CUDA."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (e.g. the run folder, whose default name holds rank 0's clock)."""
    if current_world().size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_bounds(rows: int, world: World) -> tuple[int, int]:
    """This rank's contiguous block [start, end) of `rows`: the first rows % size ranks take one row more, so
    the blocks cover every row exactly once."""
    base, extra = divmod(rows, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (world.rank < extra)


def score_sharded(rows: Sequence, score: Callable[[Sequence], Any], concatenate: Callable[[list], Any],
                  model=None) -> Any:
    """`score(rows)` computed in blocks, one per rank, and put back together in row order on every rank: the
    same result as one process scoring all rows (each row is scored once; none is repeated to even the blocks).
    When `model`'s weights are sharded (ZeRO-3, FSDP) every rank scores every row instead."""
    from tunelab.sharding import weights_are_sharded

    world = current_world()
    if world.size == 1 or weights_are_sharded(model):  # sharded weights: every rank runs every pass, all rows
        return score(rows)
    import torch.distributed as dist

    start, end = shard_bounds(len(rows), world)
    block = score(rows.select(range(start, end)) if hasattr(rows, "select") else rows[start:end])
    blocks: list[Any] = [None] * world.size
    dist.all_gather_object(blocks, block)
    return concatenate(blocks)


def check_plan(recipe: Recipe, world_size: int, nnodes: int | None = None, launched: bool | None = None,
               resume: bool = False) -> int:
    """Refuse, before anything starts, what cannot run on `world_size` processes (over `nnodes` machines, under
    torch's launcher or not; default: as the launcher's environment says); return the per-process batch."""
    import torch

    from tunelab.sharding import check_strategy

    if recipe.entry.one_process and world_size > 1:
        raise TunelabError(f"task {recipe.task} trains in one process; drop --nproc")
    if recipe.train.distributed.strategy == "fsdp" and (not recipe.entry.fsdp or recipe.method.name != "full"):
        raise TunelabError(f"train.distributed.strategy fsdp shards decoders trained in full (tasks "
                           f"{' and '.join(tasks_that('fsdp'))}, "
                           f"method full: transformers' FSDP2 takes no peft adapters yet), not task {recipe.task} with "
                           f"method {recipe.method.name}; use strategy deepspeed (zero3 shards the weights) or ddp")
    if resume and recipe.train.distributed.strategy == "fsdp":
        raise TunelabError("--resume cannot continue an fsdp run: transformers keeps no optimizer state for a model "
                           "sharded as it loads; start the run again, or train with strategy deepspeed or ddp, which "
                           "resume")
    if nnodes is None:
        nnodes = max(1, world_size // int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or 1))
    launched = "LOCAL_RANK" in os.environ if launched is None else launched
    check_strategy(recipe.train.distributed, world_size, nnodes, torch.cuda.is_available(), launched)
    return per_process_batch(recipe.train.batch_size, recipe.train.grad_accum, world_size)


@dataclass(frozen=True)
class Launch:
    """What `tunelab train --nproc …` asks of torch's launcher: processes on this machine and the machines."""

    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None

    def launcher_arguments(self) -> list[str]:
        """torchrun's own options for this launch (one machine: a private c10d rendezvous on a free port)."""
        options = ["--nproc-per-node", str(self.nproc), "--nnodes", str(self.nnodes),
                   "--local-ranks-filter", "0",  # the console shows rank 0; other ranks' errors come back by file
                   "--max-restarts", "0"]
        if self.rdzv_endpoint:
            return [*options, "--rdzv-backend", "c10d", "--rdzv-endpoint", self.rdzv_endpoint,
                    "--rdzv-id", "tunelab"]
        if self.nnodes == 1 and self.master_addr is None and self.master_port is None:
            return [*options, "--standalone"]
        return [*options, "--node-rank", str(self.node_rank), "--master-addr", self.master_addr or "127.0.0.1",
                "--master-port", str(self.master_port or 29500)]


def launch(plan: Launch, tunelab_arguments: list[str]) -> int:
    """Run `python -m tunelab <tunelab_arguments>` on plan.nproc processes through torch.distributed.run and
    wait; a failure comes back as the first failing rank's one-line error (exit 2 for a tunelab error)."""
    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # The agent's own log lines (OMP defaults, rendezvous, "closing signal SIGTERM", the failure table) would
    # bury the run's story and its one error line.
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for several processes, without its banner
    os.environ[LAUNCHED_BY_TUNELAB] = "1"
    arguments = torchrun.parse_args([*plan.launcher_arguments(), "-m", "tunelab", *tunelab_arguments])
    try:
        torchrun.run(arguments)
    except ChildFailedError as failed:
        rank, failure = first_recorded_failure(failed)
        raise LaunchFailed(rank, failure_message(failure), failure.exitcode, failure_traceback(failure)) from None
    return 0


class LaunchFailed(Exception):
    """A rank of a launched job failed: its rank, its one-line message and its exit code."""

    def __init__(self, rank: int, message: str, exitcode: int, traceback: str = "") -> None:
        super().__init__(message)
        self.rank, self.message, self.exitcode, self.traceback = rank, message, exitcode, traceback


def first_recorded_failure(failed) -> tuple[int, Any]:
    """The rank whose error is the cause. Ranks the agent stopped end by a signal without an error file, and a
    rank whose peer died fails in its next collective ("connection closed by peer") within the same second as
    the cause: so a tunelab error (exit 2) comes first, then the earliest recorded error, then the lowest rank.
    Where no rank recorded one (a crash, the kernel's OOM killer), a rank that died of itself comes before those the
    agent then stopped with SIGTERM (torch's own first failure is the earliest, and those end in the same second)."""
    recorded = {rank: failure for rank, failure in failed.failures.items() if recorded_error(failure)}
    if not recorded:
        return min(failed.failures.items(),
                   key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[1].timestamp, item[0]))
    return min(recorded.items(), key=lambda item: (item[1].exitcode != 2, item[1].timestamp, item[0]))


def recorded_error(failure) -> bool:
    """Whether a failed rank left an error file (without one, torch fills in the placeholder message "<NONE>")."""
    return failure.error_file_data.get("message") not in (None, "", "<NONE>")


def failure_message(failure) -> str:
    """The one line a failed rank recorded ('TunelabError: …' loses its class name: it is tunelab's own); for a
    rank that recorded none, how it ended."""
    if not recorded_error(failure) and failure.exitcode > 0:
        return f"process {failure.pid} (local rank {failure.local_rank}) exited with code {failure.exitcode} " \
               f"without recording an error"
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    message = str(message).strip()
    return message.removeprefix("TunelabError: ")


def failure_traceback(failure) -> str:
    """The recorded traceback of a failure that is not a tunelab error ('' for a tunelab error or none)."""
    message = failure.error_file_data.get("message")
    if failure.exitcode == 2 or not isinstance(message, dict):
        return ""
    return str(message.get("extraInfo", {}).get("py_callstack", ""))


def launched_by_tunelab() -> bool:
    """Whether `tunelab train --nproc` started this process (it then shows errors, not the process)."""
    return bool(os.environ.get(LAUNCHED_BY_TUNELAB))


def record_error(error: BaseException) -> None:
    """Leave this rank's error where the launcher reads it (TORCHELASTIC_ERROR_FILE), when one is set."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(error)


def prints_errors() -> bool:
    """Whether this process prints its own `error:` line: one process, or rank 0 under a plain torchrun (under
    `tunelab train --nproc` the launcher prints the failing rank's line once)."""
    return current_world().is_main and not launched_by_tunelab()
