"""kt-kernel (kvcache-ai/ktransformers' CPU MoE kernels, `pip install --no-deps kt-kernel gguf`) as
a same-run baseline of `pangu-ops bench --hf`: its BF16 MoE (AMX where the CPU has AMX-BF16, else
AVX2) over the transformers block's own expert weights, on its own worker pool with torch's thread
count. Forward only, bfloat16 only (its kernel's dtype). Where it does not import, the benchmark
says why and runs without it."""
from __future__ import annotations

import functools

import torch

NAME = "kt-kernel"
# kt-kernel's worker threads spin for up to ~0.1 s after a burst of calls returns: the FMA-peak limit
# timed right after them ran 4-12x slower (a 4-token Qwen3-MoE-shaped row then showed pangu_ops at
# 208% of its limit). The benchmark waits this long, untimed, after each of its kt-kernel runs.
SETTLE_S = 0.25


@functools.lru_cache(maxsize=None)
def unavailable() -> str | None:
    """None where kt-kernel runs here, else why not."""
    try:
        from kt_kernel import kt_kernel_ext  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means: no baseline
        return f"kt-kernel not installed or not importable here ({type(e).__name__}: {e})"
    return None


@functools.lru_cache(maxsize=None)
def _pool(threads: int):
    from kt_kernel import kt_kernel_ext as ext

    config = ext.WorkerPoolConfig()
    config.subpool_count, config.subpool_numa_map, config.subpool_thread_count = 1, [0], [threads]
    return ext.CPUInfer(config)


def moe(experts, max_tokens: int):
    """`run(x [T, H] bf16, ids [T, k] int64, weights [T, k]) -> y [T, H] bf16` computing transformers'
    experts block `experts` (gate_up_proj [E, 2F, H], down_proj [E, H, F]) with kt-kernel, for up to
    `max_tokens` tokens a call."""
    from kt_kernel import kt_kernel_ext as ext

    E, two_f, H = experts.gate_up_proj.shape
    F = two_f // 2
    gate = experts.gate_up_proj.detach()[:, :F].to(torch.bfloat16).contiguous()
    up = experts.gate_up_proj.detach()[:, F:].to(torch.bfloat16).contiguous()
    down = experts.down_proj.detach().to(torch.bfloat16).contiguous()
    k = experts.config.num_experts_per_tok
    pool = _pool(torch.get_num_threads())
    on_gpu = torch.zeros(E, dtype=torch.bool)  # no expert on a GPU: all on the CPU
    config = ext.moe.MOEConfig(E, k, H, F, on_gpu.data_ptr())
    config.layer_idx, config.pool, config.max_len = 0, pool.backend_, max_tokens
    config.gate_projs = [[gate[e].data_ptr() for e in range(E)]]
    config.up_projs = [[up[e].data_ptr() for e in range(E)]]
    config.down_projs = [[down[e].data_ptr() for e in range(E)]]
    config.gate_scales = config.up_scales = config.down_scales = [[0] * E]  # bf16: no scales
    kernel = getattr(ext.moe, "AMXBF16_MOE", None) or ext.moe.AVX2BF16_MOE
    layer = kernel(config)
    physical_to_logical = torch.arange(E, dtype=torch.int64)
    pool.submit(layer.load_weights_task(physical_to_logical.data_ptr()))
    pool.sync()
    out = torch.empty(max_tokens, H, dtype=torch.bfloat16)
    bsz = torch.zeros(1, dtype=torch.int32)
    keep = (gate, up, down, on_gpu, physical_to_logical)  # the kernel holds raw pointers into these

    def run(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        assert keep and x.shape[0] <= max_tokens
        x, ids, weights = x.contiguous(), ids.to(torch.int64).contiguous(), weights.float().contiguous()
        bsz[0] = x.shape[0]
        pool.submit(layer.forward_task(bsz.data_ptr(), k, ids.data_ptr(), weights.data_ptr(), x.data_ptr(),
                                       out.data_ptr(), False))
        pool.sync()
        return out[:x.shape[0]]
    return run
