"""Start `world` local ranks of a gloo process group (127.0.0.1, spawned processes, bounded
timeouts) and collect what each returns: the tests' and the benchmark's launcher. Under torchrun
use the environment instead (`dist.init_process_group()`).

`netns` (benchmark): the network namespace each rank joins before connecting, to place ranks on
emulated nodes (see `pangu_ops.benchmarks.slow_link`); then `master_addr` and `env` (e.g.
GLOO_SOCKET_IFNAME per rank) must match those namespaces.
"""
from __future__ import annotations

import ctypes
import datetime
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

CLONE_NEWNET = 0x40000000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_netns(name: str) -> None:
    with open(f"/var/run/netns/{name}") as f:
        if ctypes.CDLL(None, use_errno=True).setns(f.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name!r} failed (needs root)")


def _entry(rank: int, world: int, port: int, fn, args, out, env, timeout_s, netns, master_addr) -> None:
    if netns:
        _join_netns(netns[rank])
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(port), **(env[rank] if isinstance(env, list) else env))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        out[rank] = fn(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn(world: int, fn, *args, env: dict[str, str] | list[dict[str, str]] | None = None, timeout_s: float = 60,
          netns: list[str] | None = None, master_addr: str = "127.0.0.1") -> dict:
    """fn(rank, *args) on `world` gloo ranks; returns {rank: result}. `fn` must be importable
    (module level); `env`: extra environment, one dict for all ranks or one per rank."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_entry, args=(world, free_port(), fn, args, out, env or {}, timeout_s, netns, master_addr),
                           nprocs=world, join=True, start_method="spawn")
        return dict(out)
