"""The tests' gloo launcher: `run_ranks(world, fn, *args)` runs fn(rank, *args) on local ranks
(127.0.0.1, 60 s timeouts) and returns {rank: result}."""
from pangu_ops.distributed.launch import spawn as run_ranks

__all__ = ["run_ranks"]
