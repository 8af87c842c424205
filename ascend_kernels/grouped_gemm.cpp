// grouped_gemm on Ascend's Cube unit through AscendC's high-level Matmul API, in one launch with
// no host sync: every block reads group_sizes from GM and walks the same list of output tiles
// (group by group, tile_m x tile_n each, the last ones of a group smaller), taking every
// blockNum-th tile. The host fills the Matmul tiling for a full tile; SetSingleShape shrinks it
// for remainders. Modes:
//   forward  y[rows of e] = x[rows of e] @ w[e]     (w [E, K, N], or [E, N, K] with trans_b)
//   wgrad    dw[e] = x[rows of e]^T @ dy[rows of e] (the weight gradient; dw comes zeroed, so
//                                                    experts with no rows are skipped)
// fp32 accumulation in the cube (L0C), output rounded to the output dtype on the way out.
#include "common.h"
#include "lib/matmul_intf.h"

using namespace AscendC;

namespace pangu {

template <typename T>
class GroupedGemm {
    using AType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, T>;
    using CType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, T>;
    using BiasType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, float>;

  public:
    __aicore__ inline void Init(GM_ADDR a, GM_ADDR b, GM_ADDR groupSizes, GM_ADDR c, const GroupedGemmTiling& t) {
        t_ = t;
        int64_t bRows = t.wgrad ? t.rows : t.experts * t.k;
        aGm_.SetGlobalBuffer((__gm__ T*)a, t.rows * t.k);
        bGm_.SetGlobalBuffer((__gm__ T*)b, bRows * t.n);
        sizesGm_.SetGlobalBuffer((__gm__ int64_t*)groupSizes, t.experts);
        cGm_.SetGlobalBuffer((__gm__ T*)c, t.wgrad ? t.experts * t.k * t.n : t.rows * t.n);
        REGIST_MATMUL_OBJ(&pipe_, GetSysWorkSpacePtr(), mm_, &t_.cube);
    }
    __aicore__ inline void Process() {
        int64_t rowStart = 0, tile = 0;
        const int64_t blocks = GetBlockNum(), me = GetBlockIdx();
        for (int64_t e = 0; e < t_.experts; ++e) {
            int64_t rows = sizesGm_.GetValue(e);
            if (rows <= 0) continue;
            // output [outM, N]: forward: the group's rows; wgrad: K
            int64_t outM = t_.wgrad ? t_.k : rows, reduce = t_.wgrad ? rows : t_.k;
            for (int64_t m0 = 0; m0 < outM; m0 += t_.tile_m) {
                for (int64_t n0 = 0; n0 < t_.n; n0 += t_.tile_n, ++tile) {
                    if (tile % blocks != me) continue;
                    int64_t m = outM - m0 < t_.tile_m ? outM - m0 : t_.tile_m;
                    int64_t n = t_.n - n0 < t_.tile_n ? t_.n - n0 : t_.tile_n;
                    Tile(e, rowStart, m0, n0, m, n, reduce);
                }
            }
            rowStart += rows;
        }
        mm_.End();
    }

  private:
    __aicore__ inline void Tile(int64_t e, int64_t rowStart, int64_t m0, int64_t n0, int64_t m, int64_t n, int64_t reduce) {
        if (t_.wgrad) {
            // A = x[rows of e]^T: stored [rows, K], transposed; B = dy[rows of e] [rows, N]
            mm_.SetOrgShape(int(t_.k), int(t_.n), int(reduce), int(reduce));
            mm_.SetSingleShape(int(m), int(n), int(reduce));
            mm_.SetTensorA(aGm_[rowStart * t_.k + m0], true);
            mm_.SetTensorB(bGm_[rowStart * t_.n + n0], false);
            mm_.IterateAll(cGm_[e * t_.k * t_.n + m0 * t_.n + n0]);
        } else {
            mm_.SetOrgShape(int(m), int(t_.n), int(t_.k), int(t_.k));
            mm_.SetSingleShape(int(m), int(n), int(t_.k));
            mm_.SetTensorA(aGm_[(rowStart + m0) * t_.k], false);
            // w[e]: [K, N] row-major, or [N, K] with trans_b
            mm_.SetTensorB(bGm_[e * t_.k * t_.n + (t_.trans_b ? n0 * t_.k : n0)], bool(t_.trans_b));
            mm_.IterateAll(cGm_[(rowStart + m0) * t_.n + n0]);
        }
    }
    TPipe pipe_;
    matmul::Matmul<AType, AType, CType, BiasType> mm_;
    GlobalTensor<T> aGm_, bGm_, cGm_;
    GlobalTensor<int64_t> sizesGm_;
    GroupedGemmTiling t_;
};

template <typename T>
__aicore__ inline void RunGroupedGemm(GM_ADDR a, GM_ADDR b, GM_ADDR groupSizes, GM_ADDR c, GM_ADDR workspace,
                                      GM_ADDR tiling) {
    SetSysWorkspace(workspace);  // the Matmul API's system workspace
    RunKernel<GroupedGemm<T>, GroupedGemmTiling>(tiling, a, b, groupSizes, c);
}

}  // namespace pangu

extern "C" __global__ __aicore__ void pangu_grouped_gemm_float(GM_ADDR a, GM_ADDR b, GM_ADDR groupSizes, GM_ADDR c,
                                                               GM_ADDR workspace, GM_ADDR tiling) {
    pangu::RunGroupedGemm<float>(a, b, groupSizes, c, workspace, tiling);
}

extern "C" __global__ __aicore__ void pangu_grouped_gemm_half(GM_ADDR a, GM_ADDR b, GM_ADDR groupSizes, GM_ADDR c,
                                                              GM_ADDR workspace, GM_ADDR tiling) {
    pangu::RunGroupedGemm<half>(a, b, groupSizes, c, workspace, tiling);
}

extern "C" __global__ __aicore__ void pangu_grouped_gemm_bfloat16(GM_ADDR a, GM_ADDR b, GM_ADDR groupSizes, GM_ADDR c,
                                                                  GM_ADDR workspace, GM_ADDR tiling) {
    pangu::RunGroupedGemm<bfloat16_t>(a, b, groupSizes, c, workspace, tiling);
}
