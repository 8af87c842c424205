"""`pangu-ops bench --ecss`: ECSS's host optimizer and training within a device budget.

1. The fused host AdamW kernel (`pangu_ops.adamw_experts`, bf16 gradients and compute copy) against
   `torch.optim.AdamW(fused=True)` and `(foreach=True)` on the same [E, n] state, all experts
   updated; rate in GB/s of state touched (master, m, v read+written, bf16 gradient read, bf16
   compute copy written: 28 B per parameter, as many as torch's fused step moves with its fp32
   gradient and no copy), and as a fraction of the limit: the same access pattern with one
   multiply-add per value (`pangu_cpu::adamw_traffic`; a plain copy runs slower than
   read-modify-write streams on this machine, so memcpy is no ceiling for AdamW).
2. The optimizer time of a step whose batch uses 1 domain of 8 (the lazy kernel over that domain's
   experts) against dense AdamW over all experts (torch fused: every expert, every step).
3. A PanGu-Σ-shaped model (8 domains, RRE layers) trained with its experts on the host within a
   device budget of 1/8 of the experts' bytes, against the same model trained without ECSS:
   tokens/s and resident bytes.
4. Top-k layers under ECSS (experts fetched after each router) against no ECSS: what not knowing
   the experts in advance costs.
Timing: `timing.interleaved`, candidates and baselines in the same rounds.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .timing import interleaved

HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
BYTES_PER_PARAM = 4 * 6 + 2 + 2  # master, m, v read + written; bf16 gradient read; bf16 copy written


@dataclass
class Row:
    part: str
    impl: str
    ms: float
    rate: str
    ratio: str


def _kernel_rows(experts: int, n: int, min_time: float) -> list[Row]:
    from pangu_ops import adamw_experts

    master = torch.randn(experts, n)
    m, v, steps = torch.zeros_like(master), torch.zeros_like(master), torch.zeros(experts, dtype=torch.long)
    grads = (torch.randn(experts, n) * 1e-2).to(torch.bfloat16)
    compute = torch.empty(experts, n, dtype=torch.bfloat16)
    ids = torch.arange(experts)
    params = {k: torch.nn.Parameter(master.clone()) for k in ("fused", "foreach")}
    opts = {k: torch.optim.AdamW([p], fused=(k == "fused"), foreach=(k == "foreach"), **HYPER)
            for k, p in params.items()}
    for p in params.values():
        p.grad = grads.float()
    scratch = [torch.randn(experts, n) for _ in range(3)] + [grads.clone(), compute.clone()]
    one_domain = ids[: experts // 8]

    fns = {
        "pangu_ops adamw_experts (all)": lambda: adamw_experts(master, m, v, steps, grads, ids, compute, **HYPER),
        "torch AdamW fused=True (all)": opts["fused"].step,
        "torch AdamW foreach=True (all)": opts["foreach"].step,
        "same traffic, no AdamW math (the limit)": lambda: torch.ops.pangu_cpu.adamw_traffic(*scratch),
        "pangu_ops lazy, 1 domain of 8": lambda: adamw_experts(master, m, v, steps, grads[: len(one_domain)],
                                                                   one_domain, compute, **HYPER),
    }
    print(f"[ecss] AdamW over {experts} experts x {n} parameters", file=sys.stderr, flush=True)
    timings = dict(zip(fns, interleaved(list(fns.values()), torch.device("cpu"), rounds=5, min_time=min_time)))
    gb = experts * n * BYTES_PER_PARAM / 1e9
    best = {k: t.min for k, t in timings.items()}
    fused, limit = best["torch AdamW fused=True (all)"], best["same traffic, no AdamW math (the limit)"]
    rows = []
    for k, t in best.items():
        if k.startswith("pangu_ops lazy"):
            rows.append(Row("optimizer step, batch of 1 domain of 8", k, t * 1e3, "-",
                            f"{fused / t:.1f}x less time than dense fused AdamW"))
        else:
            rows.append(Row("host AdamW, all experts", k, t * 1e3, f"{gb / t:.1f} GB/s",
                            f"{fused / t:.2f}x fused torch, {limit / t:.0%} of the limit"))
    return rows


def _training_rows(steps: int) -> list[Row]:
    from pangu_ops import ecss
    from pangu_ops.nn import PanguSigmaConfig, PanguSigmaLM

    config = PanguSigmaConfig(vocab_size=2048, hidden=256, num_heads=4, num_layers=4, ffn=512, rre_layers=[1, 2, 3],
                              num_experts=64, num_domains=8, expert_ffn=512)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, config.vocab_size, (4, 128), generator=gen), torch.full((4,), i % 8))
               for i in range(steps)]
    tokens = sum(t.numel() for t, _ in batches)

    def loss(model, tok, dom):
        logits, _ = model(tok, dom)
        return F.cross_entropy(logits.reshape(-1, config.vocab_size), tok.reshape(-1))

    torch.manual_seed(0)
    plain = PanguSigmaLM(config)
    opt = torch.optim.AdamW(plain.parameters(), fused=True, **HYPER)
    torch.manual_seed(0)
    model = PanguSigmaLM(config)
    expert_bytes = sum(2 * m.w_gate_up.numel() * 4 + 2 * m.w_down.numel() * 4 for m in model.modules()
                       if hasattr(m, "w_gate_up"))
    store = ecss.ExpertStore(model, device_budget_bytes=expert_bytes // 8, **HYPER)
    dense = torch.optim.AdamW(store.dense_parameters(), fused=True, **HYPER)
    resident = [0]

    def train_plain():
        for tok, dom in batches:
            loss(plain, tok, dom).backward()
            opt.step()
            opt.zero_grad()

    def train_ecss():
        for tok, dom in batches:
            resident[0] = max(resident[0], store.prepare(tok, dom).resident_bytes)
            loss(model, tok, dom).backward()
            store.step()
            dense.step()
            dense.zero_grad()

    print(f"[ecss] training {steps} steps of a PanGu-Σ-shaped model, with and without ECSS", file=sys.stderr, flush=True)
    t_plain, t_ecss = interleaved([train_plain, train_ecss], torch.device("cpu"), rounds=3, min_time=0.0)
    return [
        Row("training (64 experts x 3 RRE layers, 8 domains)", "without ECSS (experts on the device)",
            t_plain.min * 1e3 / steps, f"{tokens / t_plain.min:.0f} tok/s",
            f"device holds {expert_bytes / 1e6:.1f} MB of experts (+ their AdamW state)"),
        Row("training (64 experts x 3 RRE layers, 8 domains)", "ECSS, budget 1/8 of the experts' bytes",
            t_ecss.min * 1e3 / steps, f"{tokens / t_ecss.min:.0f} tok/s",
            f"resident {resident[0] / 1e6:.2f} MB <= budget {store.budget / 1e6:.2f} MB; "
            f"{t_plain.min / t_ecss.min:.2f}x the plain run's speed"),
    ]


def _topk_rows(steps: int) -> list[Row]:
    """Top-k layers under ECSS: the router's choice read on the host and the missing experts
    uploaded during forward (the cost of not knowing the experts in advance), vs no ECSS."""
    from pangu_ops import ecss
    from pangu_ops.nn import MoEFeedForward

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(MoEFeedForward(256, 512, 64, topk=8, aux_loss_alpha=0) for _ in range(3))

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)[0]
            return x

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(512, 256, generator=gen) for _ in range(steps)]
    torch.manual_seed(0)
    plain, model = Net(), Net()
    model.load_state_dict(plain.state_dict())
    opt = torch.optim.AdamW(plain.parameters(), fused=True, **HYPER)
    store = ecss.ExpertStore(model, **HYPER)  # budget: every expert (a batch of 512 tokens x top-8 uses most)
    dense = torch.optim.AdamW(store.dense_parameters(), fused=True, **HYPER)

    def train_plain():
        for x in batches:
            plain(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

    def train_ecss():
        for x in batches:
            store.prepare()
            model(x).square().mean().backward()
            store.step()
            dense.step()
            dense.zero_grad()

    print(f"[ecss] top-k layers, {steps} steps, with and without ECSS", file=sys.stderr, flush=True)
    t_plain, t_ecss = interleaved([train_plain, train_ecss], torch.device("cpu"), rounds=3, min_time=0.0)
    tokens = 512 * steps
    return [
        Row("training, 3 top-8-of-64 layers (on-demand fetch)", "without ECSS", t_plain.min * 1e3 / steps,
            f"{tokens / t_plain.min:.0f} tok/s", ""),
        Row("training, 3 top-8-of-64 layers (on-demand fetch)", "ECSS, experts fetched after each router",
            t_ecss.min * 1e3 / steps, f"{tokens / t_ecss.min:.0f} tok/s",
            f"{t_plain.min / t_ecss.min:.2f}x the plain run's speed"),
    ]


def table(rows: list[Row]) -> str:
    head = f"{'part':<48} {'impl':<38} {'ms':>9} {'rate':>12}  ratio"
    return "\n".join([head, "-" * (len(head) + 40)] +
                     [f"{r.part:<48} {r.impl:<38} {r.ms:>9.2f} {r.rate:>12}  {r.ratio}" for r in rows])


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r.impl}" for r in rows]
    ax.barh(range(len(rows)), [r.ms for r in rows], color=["C0" if r.impl.startswith(("pangu", "ECSS")) else "C7"
                                                          for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("ms (per step for training rows; log scale)")
    ax.set_title("ECSS: host AdamW and training within a device budget")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(out_dir: Path, experts: int = 64, n: int = 1 << 20, steps: int = 8, min_time: float = 0.3) -> list[Row]:
    rows = _kernel_rows(experts, n, min_time) + _training_rows(steps) + _topk_rows(steps)
    text = table(rows)
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_ecss.txt").write_text(text + "\n")
    (out_dir / "bench_ecss.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    plot(rows, out_dir / "bench_ecss.png")
    print(f"wrote {out_dir}/bench_ecss.txt, bench_ecss.json and bench_ecss.png", file=sys.stderr)
    return rows
