"""Expert-parallel communication on torch.distributed (gloo, NCCL, HCCL): the node topology, the
hierarchical all-to-all and the expert-parallel token dispatcher.
Import explicitly: `from pangu_ops.distributed import Topology, ExpertParallelDispatcher`."""
from .all_to_all import CommunicationError, flat_all_to_all_stats, hierarchical_all_to_all
from .dispatcher import STRATEGIES, DispatchHandle, ExpertParallelDispatcher
from .topology import Topology

__all__ = ["CommunicationError", "DispatchHandle", "ExpertParallelDispatcher", "STRATEGIES", "Topology",
           "flat_all_to_all_stats", "hierarchical_all_to_all"]
