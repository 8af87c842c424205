"""Train a tiny top-k MoE language model with expert parallelism on local gloo ranks, moving the
experts to follow the load every few steps (Pangu Ultra MoE's dynamic load balancing).

Byte-level next-token prediction on the standard library's sources. Each of `--ep-ranks` ranks
(2 per "node") holds a share of every MoE layer's experts and trains on its own batches: the
dense weights are data parallel (gradients averaged), the experts expert parallel. The router has
no balance loss, so its load drifts out of balance; every `--rebalance-every` steps the ranks
all-reduce each layer's counted load, plan a placement with redundant copies of the hot experts
(`placement.rebalance_experts`, keeping experts where they are when they stay on a rank) and move
the experts with their AdamW state (`placement.rebalance`). Replicas' gradients are summed before
each step (`placement.sync_replica_grads`), so replicas stay identical.

    python examples/train_topk_ep.py [--ep-ranks 4] [--rebalance-every 20] [--steps 80]
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pangu_ops.distributed import ExpertParallelDispatcher, Topology
from pangu_ops.distributed import placement as pl
from pangu_ops.distributed.launch import spawn
from pangu_ops.nn import MoEFeedForward

CONTEXT, HIDDEN, FFN, EXPERTS, TOPK = 4, 64, 64, 16, 2


class TinyMoELM(nn.Module):
    """Embeddings of the last CONTEXT bytes -> MoE layers (residual) -> next-byte logits."""

    def __init__(self, topo: Topology, layers: int):
        super().__init__()
        self.embed = nn.Embedding(256, HIDDEN)
        self.mix = nn.Linear(CONTEXT * HIDDEN, HIDDEN)
        self.moe = nn.ModuleList(
            MoEFeedForward(HIDDEN, FFN, EXPERTS, topk=TOPK, aux_loss_alpha=0.0,
                           dispatcher=ExpertParallelDispatcher(topo, EXPERTS, "hierarchical"))
            for _ in range(layers))
        self.head = nn.Linear(HIDDEN, 256)

    def forward(self, context: torch.Tensor) -> torch.Tensor:  # context [B, CONTEXT] bytes
        h = self.mix(self.embed(context).flatten(1))
        for layer in self.moe:
            h = h + layer(F.rms_norm(h, (HIDDEN,)))[0]
        return self.head(h)


def corpus() -> torch.Tensor:
    stdlib = Path(inspect.getfile(inspect)).parent
    text = b"".join(p.read_bytes() for p in sorted(stdlib.glob("[a-m]*.py"))[:40])
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def _rank(rank: int, args) -> dict:
    torch.set_num_threads(1)
    topo = Topology(ranks_per_node=2)
    torch.manual_seed(0)  # the same dense weights on every rank; each keeps its own experts' rows
    model = TinyMoELM(topo, args.layers)
    data = corpus()
    gen = torch.Generator().manual_seed(100 + rank)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    dense = [p for n, p in model.named_parameters() if "w_gate_up" not in n and "w_down" not in n]
    log = []
    start = time.time()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(data) - CONTEXT - 1, (args.batch,), generator=gen)
        window = torch.stack([data[s:s + CONTEXT + 1] for s in starts.tolist()])
        loss = F.cross_entropy(model(window[:, :-1]), window[:, -1])
        loss.backward()
        for p in dense:  # data parallel: average the dense gradients
            dist.all_reduce(p.grad, group=topo.group)
            p.grad /= topo.world_size
        pl.sync_replica_grads(model)  # replicas of one expert: one summed gradient
        opt.step()
        opt.zero_grad()
        mean_loss = torch.tensor([loss.item()])
        dist.all_reduce(mean_loss, group=topo.group)
        mean_loss = float(mean_loss) / topo.world_size
        if args.rebalance_every and step % args.rebalance_every == 0 and step < args.steps:
            load = pl.layer_loads(model.moe, group=topo.group)
            current = torch.stack([(layer.dispatcher.placement.phy2log if layer.dispatcher.placement is not None
                                    else torch.arange(EXPERTS)) for layer in model.moe])
            physical = EXPERTS + EXPERTS // 4
            phy2log, _, _ = pl.rebalance_experts(load, physical, EXPERTS, topo.num_nodes, topo.world_size,
                                                 current=current if current.shape[1] == physical else None)
            before = pl.balancedness(load, current, topo.world_size)
            after = pl.balancedness(load, phy2log, topo.world_size)
            moved = pl.rebalance(model, list(phy2log), optimizer=opt)
            log.append((step, mean_loss, (1 / before).tolist(), (1 / after).tolist(), moved.bytes_sent))
            if rank == 0:
                print(f"step {step:4d}  loss {mean_loss:.3f}  max/mean tokens per rank "
                      + ", ".join(f"layer {l}: {b:.2f} -> {a:.2f}" for l, (b, a) in
                                  enumerate(zip((1 / before).tolist(), (1 / after).tolist())))
                      + f"  (rank 0 sent {moved.bytes_sent / 1e3:.0f} kB in {1e3 * moved.seconds:.0f} ms)",
                      flush=True)
        elif rank == 0 and step % 10 == 0:
            print(f"step {step:4d}  loss {mean_loss:.3f}  {time.time() - start:.0f}s", file=sys.stderr, flush=True)
        if step == 1:
            first = mean_loss
    return {"first": first, "last": mean_loss, "log": log}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep-ranks", type=int, default=4, help="expert-parallel ranks (2 per node), local gloo")
    parser.add_argument("--rebalance-every", type=int, default=20, help="steps between rebalances (0: never)")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=64, help="tokens per rank and step")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    if args.ep_ranks % 2 or EXPERTS % args.ep_ranks:
        parser.error(f"--ep-ranks must be even and divide {EXPERTS}")
    result = spawn(args.ep_ranks, _rank, args, env={"LOCAL_WORLD_SIZE": "2"}, timeout_s=300)[0]
    print(f"loss {result['first']:.3f} -> {result['last']:.3f}; {len(result['log'])} rebalances")
    return 0 if result["last"] < result["first"] else 1


if __name__ == "__main__":
    sys.exit(main())
