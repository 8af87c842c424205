"""Run a function on N gloo ranks (127.0.0.1, spawned processes, bounded timeouts) and collect
what each returns."""
from __future__ import annotations

import datetime
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, out, env) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        out[rank] = fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args, env: dict[str, str] | None = None) -> dict:
    """fn(rank, *args) on `world` ranks; returns {rank: result}. fn must be importable (module level)."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_entry, args=(world, _free_port(), fn, args, out, env or {}), nprocs=world, join=True,
                           start_method="spawn")
        return dict(out)
