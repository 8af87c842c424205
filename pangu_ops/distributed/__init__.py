"""Expert-parallel communication on torch.distributed (gloo, NCCL, HCCL): the node topology and
the hierarchical all-to-all. Import explicitly: `from pangu_ops.distributed import Topology`."""
from .all_to_all import flat_all_to_all_stats, hierarchical_all_to_all
from .dispatcher import DispatchHandle, ExpertParallelDispatcher
from .topology import Topology

__all__ = ["DispatchHandle", "ExpertParallelDispatcher", "Topology", "flat_all_to_all_stats", "hierarchical_all_to_all"]
