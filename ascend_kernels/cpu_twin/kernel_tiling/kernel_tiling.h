// pangu_ops AscendC CPU twin: TCubeTiling, the Matmul tiling the host fills (CANN's
// matmul_tiling::MatmulApiTiling::GetTiling) and the kernel hands to REGIST_MATMUL_OBJ. The twin's
// Matmul does not read it; its fields here are the ones pangu_ops' host code sets.
#pragma once
#include <cstdint>
struct TCubeTiling {
    int32_t usedCoreNum = 1, M = 0, N = 0, Ka = 0, Kb = 0, singleCoreM = 0, singleCoreN = 0, singleCoreK = 0;
    int32_t baseM = 0, baseN = 0, baseK = 0;
};
