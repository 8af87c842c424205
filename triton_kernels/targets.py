"""GPU targets and what fits on one of their SMs: shared by the launch code (persistent grids sized
by occupancy) and `compile_check` (which compiles for every target)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    backend: str  # "cuda" or "hip"
    arch: int | str
    warp_size: int
    shared_per_block: int  # bytes one block may use
    shared_per_sm: int
    regs_per_sm: int
    max_warps_per_sm: int


TARGETS = {
    "sm90": Target("sm90", "cuda", 90, 32, 227 * 1024, 228 * 1024, 65536, 64),
    "sm80": Target("sm80", "cuda", 80, 32, 163 * 1024, 164 * 1024, 65536, 64),
    # MI300X: 64 KiB LDS per workgroup (and per CU); 512 VGPRs x 64 lanes per SIMD, 4 SIMDs
    "gfx942": Target("gfx942", "hip", "gfx942", 64, 64 * 1024, 64 * 1024, 4 * 512 * 64, 32),
}


def occupancy(target: Target, num_warps: int, regs: int | None, shared: int) -> int:
    """Blocks of a kernel that fit on one SM / CU at once: by warps, shared memory (1 KiB reserved
    per block on NVIDIA) and registers (allocated per warp in 256-register units on NVIDIA, 8-VGPR
    units per wave on CDNA3; regs None: unknown, not limiting)."""
    fits = [target.max_warps_per_sm // num_warps]
    reserved = 1024 if target.backend == "cuda" else 0
    if shared:
        fits.append(target.shared_per_sm // (shared + reserved))
    if regs:
        unit = 256 if target.backend == "cuda" else 8 * target.warp_size
        per_warp = -(-regs * target.warp_size // unit) * unit
        fits.append(target.regs_per_sm // (per_warp * num_warps))
    return max(0, min(fits))
