"""A one-process gloo group, for tests whose code needs torch.distributed initialised
(torchscale's MoE layers all-reduce their token count over the world; fairscale's FSDP and
torch's fully_shard need a process group), torchscale's MoE gating made to run on CPU, and
the spawning of several ranks for the tests that need a real world."""

import contextlib
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A hung process group fails the test instead of stalling CI; a 4-rank world on a loaded
# 2-core machine takes minutes without hanging.
TIMEOUT_S = 300


@contextlib.contextmanager
def one_process_group():
    """A world of this process alone, torn down after, with the groups torchscale caches."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            "gloo", init_method="file://" + os.path.join(tmp, "store"), rank=0, world_size=1
        )
        try:
            yield
        finally:
            dist.destroy_process_group()
            from torchscale.component.xmoe import global_groups

            for fn in (global_groups.get_moe_group, global_groups.get_all2all_group):
                for attr in [a for a in vars(fn) if a.startswith("_")]:
                    delattr(fn, attr)  # torchscale caches its groups on these functions


def float_histc(monkeypatch) -> None:
    """torchscale's gating logs a histogram of int64 expert indices, which ``torch.histc``
    supports on CUDA only: hand it floats (no result depends on that logging)."""
    histc = torch.histc
    monkeypatch.setattr(torch, "histc", lambda x, *args, **kw: histc(x.float(), *args, **kw))


def spawn_ranks(worker, args: tuple, world: int, label: str = "") -> None:
    """Runs ``worker(rank, port, *args)`` in ``world`` spawned processes (``port``: a free one
    for ``join_world``) and waits for them; fails the test, killing them, after TIMEOUT_S."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = mp.start_processes(
        worker, args=(port, *args), nprocs=world, start_method="spawn", join=False
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not workers.join(timeout=5):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"{label}the worker processes did not finish in {TIMEOUT_S} s")


def join_world(rank: int, port: int, world: int) -> None:
    """A spawned worker's gloo group with the other ranks of ``spawn_ranks``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _saving_worker(rank: int, port: int, compute, world: int, out_dir: str) -> None:
    join_world(rank, port, world)
    try:
        result = compute(rank, world, out_dir)
        torch.save(result, os.path.join(out_dir, f"{world}_{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while another is still in a collective
    finally:
        dist.destroy_process_group()
    os._exit(0)  # saved: skip the interpreter's teardown (tests/test_distributed.py says why)


def run_worlds(compute, worlds, out_dir: str) -> dict:
    """``{world: [rank 0's result, rank 1's, ...]}``: ``compute(rank, world, out_dir)`` (a
    module-level function) run once by every rank of a gloo world of each size in ``worlds``,
    in turn, its result saved in ``out_dir`` and loaded back here."""
    runs = {}
    for world in worlds:
        spawn_ranks(_saving_worker, (compute, world, out_dir), world, f"{world} ranks: ")
        paths = [os.path.join(out_dir, f"{world}_{rank}.pt") for rank in range(world)]
        runs[world] = [torch.load(path) for path in paths]
    return runs
