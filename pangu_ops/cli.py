"""`pangu-ops info | verify | bench`."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

import pangu_ops
from pangu_ops import backends, verify
from pangu_ops.backends import cpu as cpu_backend

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _default_device(backend_names: list[str] | None = None) -> torch.device:
    """cuda if available, else cpu; but the cpu when the named backends all run there and not on
    cuda (`verify --backend cpu` on a GPU machine checks the CPU kernels, on CPU tensors)."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    named = [backends.BACKENDS[n] for n in backend_names or []]
    cpu = torch.device("cpu")
    if named and not all(b.runs_on(dev) for b in named) and all(b.runs_on(cpu) for b in named):
        return cpu
    return dev


def cmd_info(args: argparse.Namespace) -> int:
    print(f"pangu_ops {pangu_ops.__version__}  torch {torch.__version__}  python {platform.python_version()}")
    amx = cpu_backend.has_amx()
    print(f"cpu: {platform.machine()}, {torch.get_num_threads()} threads, "
          f"ISA {torch.backends.cpu.get_cpu_capability()}, AMX-BF16 tiles in the C++ kernels: "
          f"{'yes (grouped tile kernels)' if amx else 'no'}, few-row bf16 dot products by "
          f"{'VDPBF16PS (AVX512-BF16)' if cpu_backend.bf16_pair_dots() else 'fp32 FMAs'}, pangu_ops.prepack: "
          f"{'yes' if cpu_backend.packed_kernels() else 'no'}")
    print(f"cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    try:
        import triton

        print(f"triton: {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"backend in force: {backends.current_backend()} (set with use_backend() or ${backends.ENV_VAR})")
    print("backends:")
    for name, why in backends.status().items():
        where = ", ".join(backends.BACKENDS[name].devices) or "any device"
        print(f"  {name:<10} {'available' if why is None else 'unavailable':<12} runs on {where}"
              + ("" if why is None else f"\n  {'':<10} why: {why}"))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    device = torch.device(args.device) if args.device else _default_device(args.backend)
    names = args.backend or verify.available_backends(device)
    dtypes = [DTYPE_NAMES[d] for d in args.dtype] if args.dtype else list(verify.DTYPES)
    ops = args.op or list(verify.CHECKS)
    print(f"verifying {', '.join(ops)} on {', '.join(names)} ({device}) against pangu_ops.reference",
          file=sys.stderr)
    groups: dict[tuple[str, str, str], list[verify.Result]] = {}
    results = []
    for r in verify.run(ops, names, dtypes, device=device):
        results.append(r)
        key = (r.op, r.backend, r.dtype)
        if key not in groups:
            print(f"  checking {r.op} / {r.backend} / {r.dtype} ...", file=sys.stderr, flush=True)
        groups.setdefault(key, []).append(r)
    head = f"{'op':<14} {'backend':<10} {'dtype':<9} {'checks':>6} {'max err':>10} {'tolerance':<24} status"
    print(head + "\n" + "-" * len(head))
    failed = 0
    for (op, backend, dtype), rs in groups.items():
        bad = [r for r in rs if not r.ok]
        failed += len(bad)
        tol = verify.TOLERANCES[DTYPE_NAMES[dtype]]
        worst = max((r.max_err for r in rs if r.max_err == r.max_err), default=0.0)
        print(f"{op:<14} {backend:<10} {dtype:<9} {len(rs):>6} {worst:>10.3g} "
              f"{'rtol %g atol %g' % (tol['rtol'], tol['atol']):<24} {'FAIL' if bad else 'pass'}")
        for r in bad:
            print(f"    FAIL {r.case}: {r.check}: max err {r.max_err:.3g} {r.detail}")
    if args.json:
        Path(args.json).write_text(json.dumps([verify.as_dict(r) for r in results], indent=2))
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.routing and not args.hf:
        raise SystemExit("pangu-ops bench: --routing goes with --hf")
    if args.rounds is not None and (not args.hf or args.rounds < 1):
        raise SystemExit("pangu-ops bench: --rounds goes with --hf and must be >= 1")
    if args.distributed:
        return cmd_bench_distributed(args)
    if args.ecss:
        from pangu_ops.benchmarks import ecss as bench_ecss

        bench_ecss.main(Path(args.out))
        return 0
    if args.hf:
        from pangu_ops.benchmarks import hf as bench_hf

        given = {"dtypes": [DTYPE_NAMES[d] for d in args.dtype]} if args.dtype else {}
        if args.tokens:
            given["sizes"] = (args.tokens,)
        if args.routing:
            given["routings"] = tuple(args.routing)
        if args.rounds:
            given["rounds"] = args.rounds
        bench_hf.main(Path(args.out), min_time=args.min_time, **given)
        return 0
    from pangu_ops.benchmarks import ops as bench_ops

    device = torch.device(args.device) if args.device else _default_device()
    base = bench_ops.PRESETS[args.preset]
    problem = bench_ops.Problem(*(getattr(base, f) if getattr(args, f) is None else getattr(args, f)
                                  for f in ("tokens", "hidden", "ffn", "experts", "topk")))
    # Default: the backend that serves this device in production (cpu, triton on CUDA, ascend on
    # NPUs) beside torch's own routes. Emulators and verifiers (interpreted Triton, the AscendC CPU
    # twin, triton_ascend) are correctness tools: timed only when asked for with --backend.
    names = args.backend or [backends.AUTO_BY_DEVICE[device.type]]
    dtypes = [DTYPE_NAMES[d] for d in args.dtype or ["float32", "bfloat16"]]
    bench_ops.main(problem, dtypes, device, names, Path(args.out), args.min_time)
    return 0


def cmd_bench_distributed(args: argparse.Namespace) -> int:
    from pangu_ops.benchmarks import distributed as bench_dist
    from pangu_ops.benchmarks import rebalance as bench_rebalance

    if args.dtype and len(args.dtype) > 1:
        raise SystemExit("pangu-ops bench --distributed: give one --dtype")
    fields = ["tokens", "hidden", "ffn", "experts", "topk", "nodes", "ranks_per_node", "iters", "link_mbit"]
    fields += ["skew", "physical", "layers", "strategy"] if args.rebalance else ["chunks"]
    given = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.dtype:
        given["dtype"] = args.dtype[0]
    if args.rebalance:
        bench_rebalance.main(bench_rebalance.Setup(**given), Path(args.out))
    else:
        if args.skew is not None or args.physical is not None:
            raise SystemExit("pangu-ops bench --distributed: --skew and --physical go with --rebalance")
        bench_dist.main(bench_dist.Setup(**given), Path(args.out))
    return 0


def cmd_compile_check(args: argparse.Namespace) -> int:
    if backends.TRITON_INTERPRET:
        print("compile-check: unset TRITON_INTERPRET (the real compiler is what is checked)", file=sys.stderr)
        return 2
    from pangu_ops.triton_kernels import compile_check

    targets = list(compile_check.TARGETS) if args.target == "all" else [args.target]
    return compile_check.main(targets, Path(args.out) if args.out else None, configs=args.configs)


def _profile(spec: str | None, link_mbit: float | None, *, fresh: bool = False, quick: bool = False):
    """The profile named on the command line: a spec name (h200, a100, ascend910b), a JSON file,
    or this machine's calibration (made now, and cached, when there is none, or when `fresh`)."""
    from pangu_ops import sim

    if spec in sim.SPECS:
        return sim.SPECS[spec]
    if spec:
        return sim.Profile.load(Path(spec))
    cached = sim.cached_profile(link_mbit)
    if cached.exists() and not fresh:
        profile = sim.Profile.load(cached)
        if profile.dense:
            return profile
        print("plan: the cached calibration predates decoder blocks: calibrating again", file=sys.stderr)
    elif not fresh:
        print(f"plan: no calibration of this machine yet: calibrating (saved to {cached})", file=sys.stderr)
    profile = sim.calibrate(quick=quick, link_mbit=link_mbit)
    profile.save(cached)
    return profile


def cmd_plan(args: argparse.Namespace) -> int:
    from pangu_ops import sim
    from pangu_ops.benchmarks.ops import PRESETS

    if args.calibrate:
        profile = sim.calibrate(quick=args.quick, link_mbit=args.link_mbit)
        out = Path(args.out) if args.out else sim.cached_profile(args.link_mbit)
        profile.save(out)
        print(f"wrote {out}")
        return 0
    if args.validate:
        from pangu_ops.sim import validate

        # this machine: calibrated now (it drifts; a validation checks the model, not an old profile)
        profiles = {None: _profile(args.profile, None, fresh=True, quick=args.quick)}
        if args.link_mbit and not args.quick:
            profiles[args.link_mbit] = _profile(None, args.link_mbit, fresh=True)
        result = validate.run(profiles, quick=args.quick, link_mbit=args.link_mbit)
        print(validate.table(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2)) if args.json != "-" else print(json.dumps(result))
        return 0
    base = PRESETS[args.preset]
    given = {f: getattr(args, f) for f in ("tokens", "hidden", "ffn", "experts", "topk")}
    problem = sim.Layer(**{f: v if v is not None else getattr(base, f) for f, v in given.items()},
                       dtype=args.dtype, ranks=args.ranks, nodes=args.nodes, imbalance=args.imbalance,
                       backward=args.backward, block=args.block, seq=args.seq if args.block else 0)
    profile = _profile(args.profile, args.link_mbit)
    ranked = sorted(((sim.predict(profile, c), c) for c in sim.candidates(problem, args.max_chunks)),
                    key=lambda pc: pc[0]["total"])
    if args.json:
        print(json.dumps({"profile": profile.name, "source": profile.source, "problem": vars(problem),
                          "candidates": [{"strategy": c.strategy, "chunks": c.chunks, "predicted_ms": 1e3 * p["total"],
                                          "terms_ms": {k: 1e3 * v for k, v in p.items() if k != "total"}}
                                         for p, c in ranked]}, indent=2))
        return 0
    print(f"{problem}\nprofile: {profile.name} ({profile.source})")
    head = f"{'rank':<5} {'strategy':<13} {'chunks':>6} {'predicted':>11}  largest terms"
    print(head + "\n" + "-" * (len(head) + 30))
    for i, (p, c) in enumerate(ranked, 1):
        terms = sorted(((k, v) for k, v in p.items() if k != "total" and v > 0), key=lambda kv: -kv[1])[:3]
        print(f"{i:<5} {c.strategy:<13} {c.chunks:>6} {1e3 * p['total']:>9.2f}ms  "
              + ", ".join(f"{k} {1e3 * v:.2f}ms" for k, v in terms))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pangu-ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions, devices, and which backends load here (and why not)")

    v = sub.add_parser("verify", help="check every op x backend x dtype against the reference; exit 1 on failure")
    v.add_argument("--backend", action="append", choices=[n for n in backends.BACKENDS],
                   help="backend to check (repeatable; default: all that load here)")
    v.add_argument("--dtype", action="append", choices=list(DTYPE_NAMES), help="default: all")
    v.add_argument("--op", action="append", choices=list(verify.CHECKS), help="default: all")
    v.add_argument("--device", help="default: cuda if available (and the named backends run there), else cpu")
    v.add_argument("--json", help="also write every check as JSON to this file")

    from pangu_ops.benchmarks.ops import PRESETS

    b = sub.add_parser("bench", help="time the ops per backend against same-run baselines; table + JSON + PNG")
    b.add_argument("--preset", choices=list(PRESETS), default="cpu",
                   help="problem shape: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    for field in ("tokens", "hidden", "ffn", "experts", "topk"):
        b.add_argument(f"--{field}", type=int, help="override the preset's value")
    b.add_argument("--dtype", nargs="+", choices=list(DTYPE_NAMES), help="default: float32 bfloat16")
    b.add_argument("--backend", action="append", choices=[n for n in backends.BACKENDS if n != "reference"],
                   help="kernel backend to time (repeatable; default: all that load here)")
    b.add_argument("--device", help="default: cuda if available, else cpu")
    b.add_argument("--out", default="bench_out", help="folder for bench.json and bench.png")
    b.add_argument("--min-time", type=float, default=0.25, help="seconds of repeats per measurement")
    b.add_argument("--ecss", action="store_true",
                   help="ECSS: the fused host AdamW vs torch's, lazy vs dense steps, training within a device budget")
    b.add_argument("--hf", action="store_true",
                   help="transformers' MoE experts blocks: the 'pangu_ops' experts backend vs transformers' own")
    b.add_argument("--routing", nargs="+", choices=["fixed", "fresh", "cold"],
                   help="with --hf: the routings to run (default all: fixed; fresh for prefill sizes; cold for decode "
                        "sizes, each call's weights from memory)")
    b.add_argument("--rounds", type=int,
                   help="with --hf: interleaved rounds a row group (default 3)")
    d = b.add_argument_group("--distributed: flat vs hierarchical expert-parallel all-to-all on local gloo ranks "
                             "(defaults: 2 nodes x 4 ranks, 64 experts, top-8, 256 tokens/rank, H 1024, bfloat16)")
    d.add_argument("--distributed", action="store_true", help="run the expert-parallel communication benchmark")
    d.add_argument("--nodes", type=int)
    d.add_argument("--ranks-per-node", type=int)
    d.add_argument("--chunks", type=int, help="overlapped chunks of the chunked MoE step (default 4)")
    d.add_argument("--iters", type=int, help="timed iterations (default 5)")
    d.add_argument("--link-mbit", type=float,
                   help="emulate a slow inter-node link of this rate (network namespaces + tc; needs root)")
    d.add_argument("--rebalance", action="store_true",
                   help="expert load balancing instead: a skewed MoE step before and after planning redundant "
                        "experts and moving them (defaults: Zipf 1.2, 2 layers, 64 -> 72 physical experts)")
    d.add_argument("--skew", type=float, help="with --rebalance: Zipf exponent of the experts' popularity")
    d.add_argument("--physical", type=int, help="with --rebalance: physical experts per layer after rebalancing")
    d.add_argument("--layers", type=int, help="with --rebalance: MoE layers")
    d.add_argument("--strategy", choices=["flat", "hierarchical"], help="with --rebalance (default hierarchical)")

    pl = sub.add_parser("plan", help="the cost model: rank strategy x chunks for a MoE layer by predicted time; "
                        "--calibrate measures this machine, --validate checks the model against measured runs")
    pl.add_argument("--preset", choices=list(PRESETS), default="deepseek")
    for field in ("tokens", "hidden", "ffn", "experts", "topk"):
        pl.add_argument(f"--{field}", type=int,
                        help="override the preset's value" + (" (per rank)" if field == "tokens" else ""))
    pl.add_argument("--dtype", choices=list(DTYPE_NAMES), default="bfloat16")
    pl.add_argument("--ranks", type=int, default=8, help="expert-parallel ranks")
    pl.add_argument("--nodes", type=int, default=2)
    pl.add_argument("--imbalance", type=float, default=1.0, help="max / mean rows per rank (1: balanced)")
    pl.add_argument("--backward", action="store_true", help="forward + backward")
    pl.add_argument("--block", action="store_true", help="a whole decoder block (attention, norms, router) around "
                    "the MoE layer")
    pl.add_argument("--seq", type=int, default=4096, help="with --block: the sequence length")
    pl.add_argument("--max-chunks", type=int, default=8)
    pl.add_argument("--link-mbit", type=float, help="an emulated slow inter-node link (calibration, validation)")
    pl.add_argument("--profile", help="h200, a100, ascend910b (from specs) or a profile JSON; default: this "
                    "machine's calibration (made on first use)")
    pl.add_argument("--json", nargs="?", const="-", help="JSON (plan: to stdout; --validate: to this file)")
    pl.add_argument("--calibrate", action="store_true", help="measure this machine's profile")
    pl.add_argument("--validate", action="store_true", help="predicted vs measured over a grid of configurations")
    pl.add_argument("--quick", action="store_true", help="with --calibrate / --validate: fewer points (CI)")
    pl.add_argument("--out", help="with --calibrate: where to write the profile")

    c = sub.add_parser("compile-check", help="compile every Triton kernel variant for a GPU target with the real "
                       "compiler, no GPU needed: errors, shared memory, registers, spills, MMA kind")
    c.add_argument("--target", choices=["sm90", "sm80", "gfx942", "all"], default="all")
    c.add_argument("--configs", choices=["all", "first"], default="all",
                   help="every autotune config (default), or the first one the target keeps (fast)")
    c.add_argument("--out", default="bench_out", help="folder for compile_check.json ('' for none)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"info": cmd_info, "verify": cmd_verify, "bench": cmd_bench, "plan": cmd_plan,
            "compile-check": cmd_compile_check}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
