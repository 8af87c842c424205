"""Train a tiny PanGu-Σ-style language model on CPU, then extract one domain's sub-model.

Two domains of text that ship with Python: "code" (the standard library's own source files) and
"docs" (the reference documentation topics in pydoc_data). Byte-level tokens (vocabulary 256).
The bottom layers are shared dense SwiGLU layers, the top ones Random Routed Experts layers whose
experts are split between the domains. After training, `extract_domain` keeps only the docs
experts; the sub-model's loss on docs equals the full model's.

    python examples/train_rre_lm.py [--steps 300] [--backend cpu] [--ecss]

With --ecss the experts live on the host (`pangu_ops.ecss.ExpertStore`): each step loads the
batch's experts, and after backward their gradients go back to the host's fused AdamW; the dense
parameters train with torch's AdamW as usual.
"""
from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pangu_ops
from pangu_ops import ecss
from pangu_ops.nn import PanguSigmaConfig, PanguSigmaLM, extract_domain, rre_layers

DOMAINS = ("code", "docs")


def corpora() -> list[torch.Tensor]:
    """Byte tensors for each domain: stdlib sources, and pydoc's documentation topics."""
    import pydoc_data.topics as topics

    stdlib = Path(inspect.getfile(inspect)).parent
    code = b"".join(p.read_bytes() for p in sorted(stdlib.glob("[a-m]*.py"))[:60])
    docs = "\n".join(topics.topics.values()).encode("utf-8")
    return [torch.frombuffer(bytearray(text), dtype=torch.uint8).long() for text in (code, docs)]


def batch(data: list[torch.Tensor], size: int, seq: int, gen: torch.Generator, split: str):
    """`size` windows of `seq + 1` bytes, half per domain, from the train (first 90%) or eval part."""
    domains = torch.arange(size) % len(data)
    rows = []
    for d in domains.tolist():
        text = data[d]
        lo, hi = (0, int(0.9 * len(text))) if split == "train" else (int(0.9 * len(text)), len(text))
        start = int(torch.randint(lo, hi - seq - 1, (1,), generator=gen))
        rows.append(text[start:start + seq + 1])
    return torch.stack(rows), domains


def lm_loss(model, tokens, domains):
    logits, aux = model(tokens[:, :-1], domains)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)), aux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ecss", action="store_true", help="experts on the host (pangu_ops.ecss.ExpertStore)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = corpora()
    print(f"corpora: code {len(data[0]) / 1e6:.1f} MB, docs {len(data[1]) / 1e6:.1f} MB")
    config = PanguSigmaConfig(vocab_size=256, hidden=96, num_heads=4, num_layers=4, ffn=192, rre_layers=[2, 3],
                              num_experts=8, num_domains=2, expert_ffn=96, seed=args.seed)
    model = PanguSigmaLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, RRE layers {config.rre_layers}, "
          f"{config.num_experts} experts ({config.num_experts // config.num_domains} per domain)")
    store = ecss.ExpertStore(model, lr=2e-3, weight_decay=0.01) if args.ecss else None
    opt = torch.optim.AdamW(store.dense_parameters() if store else model.parameters(), lr=2e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    start, first, smooth = time.time(), None, None
    with pangu_ops.use_backend(args.backend):
        for step in range(1, args.steps + 1):
            lr = 2e-3 * min(1.0, step / 30) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            for group in opt.param_groups:
                group["lr"] = lr
            tokens, domains = batch(data, args.batch, args.seq, gen, "train")
            if store is not None:
                store.lr = lr
                store.prepare(tokens, domains)  # this batch's experts onto the device
            loss, _ = lm_loss(model, tokens, domains)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if store is not None:
                store.step()  # their gradients to the host, AdamW there
            smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
            first = first if first is not None else loss.item()
            done = step / args.steps
            bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
            print(f"\r[{bar}] step {step}/{args.steps}  loss {smooth:.3f}  {time.time() - start:5.0f}s",
                  end="\n" if step % 50 == 0 or step == args.steps else "", file=sys.stderr, flush=True)

        if store is not None:
            st = store.stats
            print(f"ECSS: last step {st.experts_updated} experts updated on the host, {st.h2d_bytes / 1e6:.2f} MB up, "
                  f"{st.d2h_bytes / 1e6:.2f} MB of gradients down, {st.resident_bytes / 1e6:.2f} MB resident")
            store.restore_model()  # the full experts back in the model: evaluation and extraction as usual
        model.eval()
        eval_gen = torch.Generator().manual_seed(1234)
        tokens, domains = batch(data, 32, args.seq, eval_gen, "eval")
        with torch.no_grad():
            per_domain = {}
            for d, name in enumerate(DOMAINS):
                mine = domains == d
                per_domain[name] = lm_loss(model, tokens[mine], domains[mine])[0].item()
            print(f"loss: first step {first:.3f} -> last {smooth:.3f} (train, smoothed); eval " +
                  ", ".join(f"{n} {v:.3f}" for n, v in per_domain.items()))
            docs = extract_domain(model, DOMAINS.index("docs"))
            mine = domains == DOMAINS.index("docs")
            sub_loss = lm_loss(docs, tokens[mine], domains[mine])[0].item()
            full_params = sum(p.numel() for p in model.parameters())
            sub_params = sum(p.numel() for p in docs.parameters())
            experts = [layer.num_experts for layer in rre_layers(docs)]
            print(f"extracted 'docs' sub-model: {sub_params / 1e6:.2f} M of {full_params / 1e6:.2f} M parameters, "
                  f"experts per RRE layer {experts}; docs eval loss {sub_loss:.3f} (full model {per_domain['docs']:.3f})")
    if not smooth < first:
        print("the loss did not fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
