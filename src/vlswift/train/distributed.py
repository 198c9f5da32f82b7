"""Several processes: the torchrun re-launch, the process group, DDP / FSDP2 wrapping, data shards.

``NPROC_PER_NODE=N vlswift sft ...`` (or ``NNODES``) re-runs the recipe under ``torchrun`` as
swift does; the arguments travel as a JSON file, so the Python API re-launches the same way.
Every process trains on its own shard of each global batch; gradients are averaged by DDP or
reduce-scattered by FSDP2, and only rank 0 writes files.

A user error in a rank (a bad dataset row, a missing folder) reaches the user as one line: the
rank writes it to a report file instead of printing it, torchrun's agent runs quietly
(:func:`agent_main`), and the re-launching process raises it again (:func:`launch_torchrun`).
Work only rank 0 does (reading the data) goes through :func:`on_main`, so when it fails the
other ranks stop at once instead of waiting on rank 0 until the process group times out.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

RESULT_ENV = "VLSWIFT_SFT_RESULT"
ERRORS_ENV = "VLSWIFT_SFT_ERRORS"  # a folder where each failing rank writes rank<N>.json
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Launching


def torchrun_requested() -> bool:
    """True when NPROC_PER_NODE/NNODES ask for several processes and we are not one of them yet."""
    launched = "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
    wanted = int(os.environ.get("NPROC_PER_NODE", "1")) * int(os.environ.get("NNODES", "1"))
    return wanted > 1 and not launched


def torchrun_command(args_file: Path) -> list[str]:
    """``python -m vlswift.train.distributed --nproc_per_node N [...] -m vlswift.train.recipe ARGS.json``
    (torchrun's own flags, run by :func:`agent_main`)."""
    cmd = [sys.executable, "-m", "vlswift.train.distributed", "--nproc_per_node", os.environ.get("NPROC_PER_NODE", "1")]
    for env, flag in (("NNODES", "--nnodes"), ("NODE_RANK", "--node_rank"),
                      ("MASTER_ADDR", "--master_addr"), ("MASTER_PORT", "--master_port")):
        if os.environ.get(env):
            cmd += [flag, os.environ[env]]
    return cmd + ["-m", "vlswift.train.recipe", str(args_file)]


def launch_torchrun(args: dict[str, Any]) -> dict[str, Any]:
    """Run the recipe in ``NPROC_PER_NODE`` processes and return rank 0's result (the API's return value).

    A rank's user error is raised here again with its one-line message (rank 0's when several
    ranks failed), e.g. :class:`~vlswift.train.data.DatasetError` for a bad dataset.
    """
    with tempfile.TemporaryDirectory(prefix="vlswift-sft-") as tmp:
        args_file, result_file, errors = Path(tmp) / "sft_args.json", Path(tmp) / "result.json", Path(tmp) / "errors"
        args_file.write_text(json.dumps(args))
        errors.mkdir()
        env = {**os.environ, RESULT_ENV: str(result_file), ERRORS_ENV: str(errors)}
        env.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets, without its banner about it
        code = subprocess.call(torchrun_command(args_file), env=env)
        if code != 0:
            raise reported_error(errors) or ChildProcessError(
                f"torchrun exited with status {code} (the processes' errors are above)")
        # Ranks on other nodes have no result; rank 0's node does.
        return json.loads(result_file.read_text()) if result_file.is_file() else {}


def report_error(error: BaseException) -> bool:
    """In a rank started by :func:`launch_torchrun`: leave ``error`` for the launcher to raise
    (True); elsewhere (torchrun run by hand) False, and the caller prints it."""
    folder = os.environ.get(ERRORS_ENV)
    if not folder or not Path(folder).is_dir():
        return False
    kind = next((c.__name__ for c in type(error).__mro__ if c.__name__ in _reported_types()), "ChildProcessError")
    from .checkpointing import write_json  # it imports this module

    rank = int(os.environ.get("RANK", "0"))
    write_json(Path(folder) / f"rank{rank}.json",
               {"rank": rank, "type": kind, "message": str(error) or type(error).__name__})
    return True


def _reported_types() -> dict[str, type[Exception]]:
    """What a rank's error is raised as again: the first of these in its MRO (else ChildProcessError)."""
    from .data import DatasetError

    return {"DatasetError": DatasetError, "FileNotFoundError": FileNotFoundError, "ValueError": ValueError}


def reported_error(folder: Path) -> Exception | None:
    """The error the lowest failing rank reported (``[rank N]`` in front unless it is rank 0), or None."""
    reports = sorted((json.loads(p.read_text()) for p in Path(folder).glob("rank*.json")), key=lambda r: r["rank"])
    if not reports:
        return None
    first = reports[0]
    message = first["message"] if first["rank"] == 0 else f"[rank {first['rank']}] {first['message']}"
    return _reported_types().get(first["type"], ChildProcessError)(message)


def agent_main(argv: list[str]) -> None:
    """``python -m vlswift.train.distributed TORCHRUN_ARGS``: torchrun, without its failure noise.

    When a rank fails torchrun logs it, signals the others and ends in a ``ChildFailedError``
    traceback with a table of exit codes: some forty lines that bury the rank's own one-line
    error. Here a failure the ranks reported (:func:`report_error`) ends quietly with status 1,
    and any other failure in one line per failed rank.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.disable(logging.ERROR)  # torchrun's logs of the failure; what matters is said below
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        folder = os.environ.get(ERRORS_ENV)
        if not (folder and any(Path(folder).glob("rank*.json"))):
            for rank, failure in sorted(e.failures.items()):
                how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"status {failure.exitcode}"
                print(f"error: rank {rank} (pid {failure.pid}) exited with {how}", file=sys.stderr)
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# Process group


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this run created the process group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str | None, device: torch.device, force: bool = False) -> DistInfo:
    """Join the process group torchrun set up (or stay single-process); pick this rank's device.

    ``force`` makes a one-process group when not under torchrun (FSDP needs one even alone).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if world_size == 1:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # FSDP's mesh needs an index
        owns = force and not dist.is_initialized()
        if owns:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return DistInfo(device=device, owns_group=owns)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return DistInfo(rank, local_rank, world_size, device, owns)


def close_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums of ``values`` over all ranks (the values themselves when single-process)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T], share: bool = False) -> T | None:
    """``fn()`` on rank 0 only; its result on every rank with ``share``, else None on the others.

    When ``fn`` raises on rank 0 the others raise :class:`MainRankFailed` at once (rank 0 says
    what went wrong), rather than waiting for rank 0 until gloo or NCCL gives up with a
    "connection reset" traceback of their own.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    value = None
    if dist.get_rank() == 0:
        try:
            value = fn()
        except BaseException:
            broadcast_object((False, None))
            raise
    ok, shared = broadcast_object((True, value if share else None))
    if not ok:
        raise MainRankFailed("rank 0 failed; its error says why")
    return shared if share else value


class MainRankFailed(ChildProcessError):
    """Raised on the other ranks when rank 0 failed in :func:`on_main` (rank 0 reports the error)."""


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# Data shards


class ShardSampler(torch.utils.data.Sampler[int]):
    """The dataset indices one rank reads in one epoch.

    As ``DistributedSampler``: a shuffle seeded with ``seed + epoch``, padded (by wrapping) to a
    multiple of the world size, every ``world_size``-th index from ``rank``. So one process with
    batch size ``B * N`` sees the same global batches as ``N`` processes with batch size ``B``.
    ``skip`` drops the indices already consumed before a resume.

    With ``lengths`` (one per dataset index) and ``group_size`` (a multiple of the global batch)
    the shuffled order is cut into groups of ``group_size`` and each group sorted longest first,
    so a batch holds samples of similar length (less padding); the group holding the longest
    sample goes first, so a batch that does not fit in memory fails at once (as
    transformers' ``group_by_length``).
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0,
                 shuffle: bool = True, skip: int = 0, lengths: Sequence[int] | None = None,
                 group_size: int = 0):
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
        padded = -(-n // world_size) * world_size
        padding = [False] * n + [True] * (padded - n)
        order = (order * (padded // max(n, 1) + 1))[:padded]
        if lengths is not None and group_size > 1:
            order, padding = group_by_length(order, padding, lengths, group_size)
        self.indices = order[rank::world_size][skip:]
        self.is_padding = padding[rank::world_size][skip:]  # repeats that only even out the shards

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def group_by_length(order: list[int], padding: list[bool], lengths: Sequence[int],
                    group_size: int) -> tuple[list[int], list[bool]]:
    """``order`` (and its padding flags) with each run of ``group_size`` sorted longest first,
    the run holding the longest sample moved to the front."""
    pairs = list(zip(order, padding))
    groups = [sorted(pairs[i:i + group_size], key=lambda pair: -lengths[pair[0]])
              for i in range(0, len(pairs), group_size)]
    if groups:
        longest = max(range(len(groups)), key=lambda i: lengths[groups[i][0][0]])
        groups.insert(0, groups.pop(longest))
    flat = [pair for group in groups for pair in group]
    return [i for i, _ in flat], [pad for _, pad in flat]


# ---------------------------------------------------------------------------------------------
# Wrapping the model


def keep_vision_in_every_step(model: nn.Module) -> None:
    """Run the vision tower on a blank image when a batch has none, adding 0 x its output.

    Under FSDP every rank must all-gather the same blocks in the same order, and under DDP a
    trainable vision tower must get a gradient on every rank; a rank whose batch is text-only
    would skip the tower and hang (FSDP) or fail (DDP) the step.
    """
    inner = model.transformer
    size = inner.visual.image_size

    def before(module, args):
        images = args[1] if len(args) > 1 else None
        if images is None:
            weight = module.visual.conv1.weight
            blank = torch.zeros(1, 3, size, size, device=weight.device, dtype=torch.float32)
            module._blank_vision = module.visual(blank)

    def after(module, args, output):
        blank = module.__dict__.pop("_blank_vision", None)
        return output if blank is None else output + 0.0 * blank.mean().to(output.dtype)

    inner.register_forward_pre_hook(before)
    inner.register_forward_hook(after)


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def wrap_fsdp(model: nn.Module, info: DistInfo) -> nn.Module:
    """FSDP2: each decoder block and vision block is a unit, the rest (embeddings, head) the root.

    Weights, gradients and optimizer state are sharded over the ranks; a block's full weights
    exist only while it runs. ``fully_shard`` moves the shards to the mesh's device.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..models.qwen import QWenBlock
    from ..models.visual import VisualBlock

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for module in model.modules():
        if isinstance(module, (QWenBlock, VisualBlock)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (FSDP2 modules are the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce/reduce-scatter on micro-batches before the last of a step."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if is_fsdp(model):
        model.set_requires_gradient_sync(enabled)
    yield


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (gathered from FSDP shards); {} on other ranks."""
    if not is_fsdp(model):
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shard of the optimizer state (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(folder))


def load_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


if __name__ == "__main__":
    agent_main(sys.argv[1:])
