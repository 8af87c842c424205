// Shared by pangu_ops' AscendC kernels: tiling structs (filled on the host, read by the kernels),
// and row movement between Global Memory and the Unified Buffer for any row length.
#pragma once
#include "kernel_operator.h"
#include "kernel_tiling/kernel_tiling.h"

namespace pangu {

constexpr uint32_t ALIGN_BYTES = 32;       // DataCopy unit
constexpr uint32_t ROW_TILE_BYTES = 16384;  // one UB buffer of a row tile (x2 for double buffering)
constexpr uint32_t IDS_TILE = 2048;         // expert ids / indices staged in UB per step
constexpr int32_t BUFFER_NUM = 2;           // double buffering

struct PermuteTiling {
    int64_t tokens, topk, experts, hidden, rows, blocks;
};
struct UnpermuteTiling {
    int64_t tokens, topk, hidden, rows, blocks, has_weights;
};
struct GroupedGemmTiling {
    int64_t experts, rows, k, n, tile_m, tile_n, trans_b, wgrad, blocks;
    TCubeTiling cube;
};

// Scalar read of a tiling struct from GM.
template <typename T>
__aicore__ inline void LoadTiling(T& t, GM_ADDR tiling) {
    t = *reinterpret_cast<__gm__ T*>(tiling);
}

// A kernel entry's body: the tiling from GM, then Op's Init(args..., tiling) and Process().
template <typename Op, typename Tiling, typename... Args>
__aicore__ inline void RunKernel(GM_ADDR tiling, Args... args) {
    Tiling t;
    LoadTiling(t, tiling);
    Op op;
    op.Init(args..., t);
    op.Process();
}

// [begin, end) of `n` items for this block, in contiguous, balanced ranges.
__aicore__ inline void BlockRange(int64_t n, int64_t& begin, int64_t& end) {
    int64_t b = AscendC::GetBlockIdx(), blocks = AscendC::GetBlockNum();
    begin = n * b / blocks;
    end = n * (b + 1) / blocks;
}

__aicore__ inline uint32_t AlignUp(uint32_t bytes) { return (bytes + ALIGN_BYTES - 1) / ALIGN_BYTES * ALIGN_BYTES; }

// `count` elements GM -> UB: DataCopy when whole 32-byte blocks, DataCopyPad otherwise.
template <typename T>
__aicore__ inline void CopyIn(const AscendC::LocalTensor<T>& dst, const AscendC::GlobalTensor<T>& src, uint32_t count) {
    if (count * sizeof(T) % ALIGN_BYTES == 0) {
        AscendC::DataCopy(dst, src, count);
    } else {
        AscendC::DataCopyExtParams p{1, uint32_t(count * sizeof(T)), 0, 0, 0};
        AscendC::DataCopyPadExtParams<T> pad{false, 0, 0, T()};
        AscendC::DataCopyPad(dst, src, p, pad);
    }
}

template <typename T>
__aicore__ inline void CopyOut(const AscendC::GlobalTensor<T>& dst, const AscendC::LocalTensor<T>& src, uint32_t count) {
    if (count * sizeof(T) % ALIGN_BYTES == 0) {
        AscendC::DataCopy(dst, src, count);
    } else {
        AscendC::DataCopyExtParams p{1, uint32_t(count * sizeof(T)), 0, 0, 0};
        AscendC::DataCopyPad(dst, src, p);
    }
}

// A GM array read tile by tile (IDS_TILE elements) through a double-buffered UB queue: the
// expert ids and slot indices the scalar loops of permute and unpermute walk.
template <typename T>
class StagedInput {
  public:
    __aicore__ inline void Init(AscendC::TPipe& pipe, GM_ADDR gm, int64_t size) {
        gm_.SetGlobalBuffer((__gm__ T*)gm, size);
        pipe.InitBuffer(que_, BUFFER_NUM, IDS_TILE * sizeof(T));
    }
    // elements of the tile starting at `start`, before `end`
    static __aicore__ inline uint32_t TileLen(int64_t start, int64_t end) {
        return uint32_t(end - start < IDS_TILE ? end - start : IDS_TILE);
    }
    __aicore__ inline AscendC::LocalTensor<T> Load(int64_t start, uint32_t n) {
        AscendC::LocalTensor<T> tile = que_.template AllocTensor<T>();
        CopyIn(tile, gm_[start], n);
        que_.EnQue(tile);
        return que_.template DeQue<T>();
    }
    __aicore__ inline void Release(const AscendC::LocalTensor<T>& tile) { que_.FreeTensor(tile); }

  private:
    AscendC::TQue<AscendC::TPosition::VECIN, 1> que_;
    AscendC::GlobalTensor<T> gm_;
};

}  // namespace pangu
