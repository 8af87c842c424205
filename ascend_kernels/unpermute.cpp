// unpermute on Ascend: y[t] = sum_j weights[t, j] * y_sorted[row of slot (t, j)], in fp32, in two
// launches:
//   pangu_unpermute_inverse  each block writes inverse[sorted_index[r]] = r for its rows
//                            (inverse comes filled with -1: dropped slots stay -1)
//   pangu_unpermute_reduce_* each block sums its tokens' rows, tile by tile along the hidden
//                            dimension: CopyIn (double-buffered) -> Cast to fp32 -> Axpy into an
//                            fp32 accumulator -> Cast to the output dtype -> CopyOut.
// Slot indices are validated on the host; out-of-range ones are skipped, never dereferenced.
#include "common.h"

using namespace AscendC;

namespace pangu {
constexpr uint32_t H_TILE = 2048;  // hidden elements per step: 8 KiB fp32 accumulator

class UnpermuteInverse {
  public:
    __aicore__ inline void Init(GM_ADDR sortedIndex, GM_ADDR inverse, const UnpermuteTiling& t) {
        t_ = t;
        BlockRange(t.rows, begin_, end_);
        index_.Init(pipe_, sortedIndex, t.rows);
        inverseGm_.SetGlobalBuffer((__gm__ int64_t*)inverse, t.tokens * t.topk);
    }
    __aicore__ inline void Process() {
        for (int64_t r0 = begin_; r0 < end_; r0 += IDS_TILE) {
            uint32_t n = index_.TileLen(r0, end_);
            LocalTensor<int64_t> index = index_.Load(r0, n);
            for (uint32_t i = 0; i < n; ++i) {
                int64_t slot = index.GetValue(i);
                if (slot >= 0 && slot < t_.tokens * t_.topk) inverseGm_.SetValue(slot, r0 + i);
            }
            index_.Release(index);
        }
    }
  private:
    TPipe pipe_;
    StagedInput<int64_t> index_;
    GlobalTensor<int64_t> inverseGm_;
    UnpermuteTiling t_;
    int64_t begin_ = 0, end_ = 0;
};

template <typename T>
class UnpermuteReduce {
  public:
    __aicore__ inline void Init(GM_ADDR ySorted, GM_ADDR inverse, GM_ADDR weights, GM_ADDR y,
                                const UnpermuteTiling& t) {
        t_ = t;
        BlockRange(t.tokens, begin_, end_);
        ySortedGm_.SetGlobalBuffer((__gm__ T*)ySorted, t.rows * t.hidden);
        inverseGm_.SetGlobalBuffer((__gm__ int64_t*)inverse, t.tokens * t.topk);
        if (t.has_weights) weightsGm_.SetGlobalBuffer((__gm__ float*)weights, t.tokens * t.topk);
        yGm_.SetGlobalBuffer((__gm__ T*)y, t.tokens * t.hidden);
        pipe_.InitBuffer(inQue_, BUFFER_NUM, H_TILE * sizeof(T));
        pipe_.InitBuffer(outQue_, BUFFER_NUM, H_TILE * sizeof(T));
        pipe_.InitBuffer(acc_, H_TILE * sizeof(float));
        pipe_.InitBuffer(rowF32_, H_TILE * sizeof(float));
    }
    __aicore__ inline void Process() {
        for (int64_t t = begin_; t < end_; ++t)
            for (int64_t h = 0; h < t_.hidden; h += H_TILE)
                Token(t, h, uint32_t(t_.hidden - h < H_TILE ? t_.hidden - h : H_TILE));
    }
  private:
    __aicore__ inline void Token(int64_t t, int64_t h, uint32_t n) {
        LocalTensor<float> acc = acc_.Get<float>();
        Duplicate(acc, 0.0f, int32_t(n));
        for (int64_t j = 0; j < t_.topk; ++j) {
            int64_t r = inverseGm_.GetValue(t * t_.topk + j);
            if (r < 0 || r >= t_.rows) continue;  // dropped slot
            float w = t_.has_weights ? weightsGm_.GetValue(t * t_.topk + j) : 1.0f;
            LocalTensor<T> row = inQue_.AllocTensor<T>();
            CopyIn(row, ySortedGm_[r * t_.hidden + h], n);  // CopyIn stage
            inQue_.EnQue(row);
            row = inQue_.DeQue<T>();                         // Compute stage
            if constexpr (std::is_same<T, float>::value) {
                Axpy(acc, row, w, int32_t(n));
            } else {
                LocalTensor<float> rowF32 = rowF32_.Get<float>();
                Cast(rowF32, row, RoundMode::CAST_NONE, n);
                Axpy(acc, rowF32, w, int32_t(n));
            }
            inQue_.FreeTensor(row);
        }
        LocalTensor<T> out = outQue_.AllocTensor<T>();
        if constexpr (std::is_same<T, float>::value) {
            Adds(out, acc, 0.0f, int32_t(n));
        } else {
            Cast(out, acc, RoundMode::CAST_RINT, n);
        }
        outQue_.EnQue(out);
        out = outQue_.DeQue<T>();                            // CopyOut stage
        CopyOut(yGm_[t * t_.hidden + h], out, n);
        outQue_.FreeTensor(out);
    }
    TPipe pipe_;
    TQue<TPosition::VECIN, 1> inQue_;
    TQue<TPosition::VECOUT, 1> outQue_;
    TBuf<TPosition::VECCALC> acc_, rowF32_;
    GlobalTensor<T> ySortedGm_, yGm_;
    GlobalTensor<int64_t> inverseGm_;
    GlobalTensor<float> weightsGm_;
    UnpermuteTiling t_;
    int64_t begin_ = 0, end_ = 0;
};

}  // namespace pangu

extern "C" __global__ __aicore__ void pangu_unpermute_inverse(GM_ADDR sortedIndex, GM_ADDR inverse, GM_ADDR tiling) {
    pangu::RunKernel<pangu::UnpermuteInverse, pangu::UnpermuteTiling>(tiling, sortedIndex, inverse);
}

extern "C" __global__ __aicore__ void pangu_unpermute_reduce_float(GM_ADDR ySorted, GM_ADDR inverse, GM_ADDR weights,
                                                                   GM_ADDR y, GM_ADDR tiling) {
    pangu::RunKernel<pangu::UnpermuteReduce<float>, pangu::UnpermuteTiling>(tiling, ySorted, inverse, weights, y);
}

extern "C" __global__ __aicore__ void pangu_unpermute_reduce_half(GM_ADDR ySorted, GM_ADDR inverse, GM_ADDR weights,
                                                                  GM_ADDR y, GM_ADDR tiling) {
    pangu::RunKernel<pangu::UnpermuteReduce<half>, pangu::UnpermuteTiling>(tiling, ySorted, inverse, weights, y);
}

extern "C" __global__ __aicore__ void pangu_unpermute_reduce_bfloat16(GM_ADDR ySorted, GM_ADDR inverse,
                                                                      GM_ADDR weights, GM_ADDR y, GM_ADDR tiling) {
    pangu::RunKernel<pangu::UnpermuteReduce<bfloat16_t>, pangu::UnpermuteTiling>(tiling, ySorted, inverse, weights, y);
}
