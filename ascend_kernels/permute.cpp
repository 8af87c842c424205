// permute on Ascend: rows of x grouped by expert (stable), in three launches, as Ascend's own
// MoeInitRouting splits it (count, scatter, gather):
//   pangu_permute_count   each block histograms the expert ids of its token range -> workspace
//   pangu_permute_scatter each block turns all blocks' histograms into its write offsets and
//                         writes sorted_index (block 0 also group_sizes)
//   pangu_permute_gather  each block copies its range of destination rows, GM -> UB -> GM,
//                         double-buffered, in row tiles of any byte length
// Expert ids are int32, validated on the host (ids outside [-1, E) are skipped here, never
// written out of bounds). The gather moves bytes, so one kernel serves every dtype.
#include "common.h"

using namespace AscendC;

namespace pangu {

class PermuteCount {
  public:
    __aicore__ inline void Init(GM_ADDR ids, GM_ADDR workspace, const PermuteTiling& t) {
        t_ = t;
        BlockRange(t.tokens, begin_, end_);
        ids_.Init(pipe_, ids, t.tokens * t.topk);
        wsGm_.SetGlobalBuffer((__gm__ int32_t*)workspace, t.blocks * t.experts);
        pipe_.InitBuffer(histQue_, 1, AlignUp(t.experts * sizeof(int32_t)));
    }
    __aicore__ inline void Process() {
        LocalTensor<int32_t> hist = histQue_.AllocTensor<int32_t>();
        for (int64_t e = 0; e < t_.experts; ++e) hist.SetValue(e, 0);
        for (int64_t s = begin_ * t_.topk; s < end_ * t_.topk; s += IDS_TILE) {
            uint32_t n = ids_.TileLen(s, end_ * t_.topk);
            LocalTensor<int32_t> ids = ids_.Load(s, n);
            for (uint32_t i = 0; i < n; ++i) {
                int32_t e = ids.GetValue(i);
                if (e >= 0 && e < t_.experts) hist.SetValue(e, hist.GetValue(e) + 1);
            }
            ids_.Release(ids);
        }
        histQue_.EnQue(hist);
        hist = histQue_.DeQue<int32_t>();
        CopyOut(wsGm_[GetBlockIdx() * t_.experts], hist, uint32_t(t_.experts));
        histQue_.FreeTensor(hist);
    }
  private:
    TPipe pipe_;
    StagedInput<int32_t> ids_;
    TQue<TPosition::VECOUT, 1> histQue_;
    GlobalTensor<int32_t> wsGm_;
    PermuteTiling t_;
    int64_t begin_ = 0, end_ = 0;
};

class PermuteScatter {
  public:
    __aicore__ inline void Init(GM_ADDR ids, GM_ADDR workspace, GM_ADDR groupSizes, GM_ADDR sortedIndex,
                                const PermuteTiling& t) {
        t_ = t;
        BlockRange(t.tokens, begin_, end_);
        ids_.Init(pipe_, ids, t.tokens * t.topk);
        wsGm_.SetGlobalBuffer((__gm__ int32_t*)workspace, t.blocks * t.experts);
        sizesGm_.SetGlobalBuffer((__gm__ int64_t*)groupSizes, t.experts);
        indexGm_.SetGlobalBuffer((__gm__ int64_t*)sortedIndex, t.rows);
        pipe_.InitBuffer(rowQue_, 1, AlignUp(t.experts * sizeof(int32_t)));
        pipe_.InitBuffer(offsets_, AlignUp(t.experts * sizeof(int64_t)));
        pipe_.InitBuffer(sizesQue_, 1, AlignUp(t.experts * sizeof(int64_t)));
    }
    __aicore__ inline void Process() {
        // offsets[e] = rows of experts < e (all blocks) + rows of expert e in blocks before this one
        LocalTensor<int64_t> totals = sizesQue_.AllocTensor<int64_t>();
        LocalTensor<int64_t> offsets = offsets_.Get<int64_t>();
        for (int64_t e = 0; e < t_.experts; ++e) { totals.SetValue(e, 0); offsets.SetValue(e, 0); }
        for (int64_t b = 0; b < t_.blocks; ++b) {
            LocalTensor<int32_t> row = rowQue_.AllocTensor<int32_t>();
            CopyIn(row, wsGm_[b * t_.experts], uint32_t(t_.experts));
            rowQue_.EnQue(row);
            row = rowQue_.DeQue<int32_t>();
            for (int64_t e = 0; e < t_.experts; ++e) {
                totals.SetValue(e, totals.GetValue(e) + row.GetValue(e));
                if (b < GetBlockIdx()) offsets.SetValue(e, offsets.GetValue(e) + row.GetValue(e));
            }
            rowQue_.FreeTensor(row);
        }
        int64_t before = 0;
        for (int64_t e = 0; e < t_.experts; ++e) {
            offsets.SetValue(e, offsets.GetValue(e) + before);
            before += totals.GetValue(e);
        }
        for (int64_t s = begin_ * t_.topk; s < end_ * t_.topk; s += IDS_TILE) {
            uint32_t n = ids_.TileLen(s, end_ * t_.topk);
            LocalTensor<int32_t> ids = ids_.Load(s, n);
            for (uint32_t i = 0; i < n; ++i) {
                int32_t e = ids.GetValue(i);
                if (e < 0 || e >= t_.experts) continue;
                int64_t dest = offsets.GetValue(e);
                offsets.SetValue(e, dest + 1);
                indexGm_.SetValue(dest, s + i);
            }
            ids_.Release(ids);
        }
        sizesQue_.EnQue(totals);
        totals = sizesQue_.DeQue<int64_t>();
        if (GetBlockIdx() == 0) CopyOut(sizesGm_, totals, uint32_t(t_.experts));
        sizesQue_.FreeTensor(totals);
    }
  private:
    TPipe pipe_;
    StagedInput<int32_t> ids_;
    TQue<TPosition::VECIN, 1> rowQue_;
    TQue<TPosition::VECOUT, 1> sizesQue_;
    TBuf<TPosition::VECCALC> offsets_;
    GlobalTensor<int32_t> wsGm_;
    GlobalTensor<int64_t> sizesGm_, indexGm_;
    PermuteTiling t_;
    int64_t begin_ = 0, end_ = 0;
};

class PermuteGather {
  public:
    // elemBytes: the dtype's size; rows move as bytes
    __aicore__ inline void Init(GM_ADDR x, GM_ADDR sortedIndex, GM_ADDR xSorted, int64_t elemBytes,
                                const PermuteTiling& t) {
        t_ = t;
        rowBytes_ = t.hidden * elemBytes;
        BlockRange(t.rows, begin_, end_);
        xGm_.SetGlobalBuffer((__gm__ uint8_t*)x, t.tokens * rowBytes_);
        indexGm_.SetGlobalBuffer((__gm__ int64_t*)sortedIndex, t.rows);
        outGm_.SetGlobalBuffer((__gm__ uint8_t*)xSorted, t.rows * rowBytes_);
        pipe_.InitBuffer(que_, BUFFER_NUM, ROW_TILE_BYTES);
    }
    __aicore__ inline void Process() {
        for (int64_t r = begin_; r < end_; ++r) {
            int64_t token = indexGm_.GetValue(r) / t_.topk;
            for (int64_t h = 0; h < rowBytes_; h += ROW_TILE_BYTES) {
                uint32_t n = uint32_t(rowBytes_ - h < ROW_TILE_BYTES ? rowBytes_ - h : ROW_TILE_BYTES);
                LocalTensor<uint8_t> tile = que_.AllocTensor<uint8_t>();
                CopyIn(tile, xGm_[token * rowBytes_ + h], n);
                que_.EnQue(tile);
                tile = que_.DeQue<uint8_t>();
                CopyOut(outGm_[r * rowBytes_ + h], tile, n);
                que_.FreeTensor(tile);
            }
        }
    }
  private:
    TPipe pipe_;
    TQueBind<TPosition::VECIN, TPosition::VECOUT, 1> que_;
    GlobalTensor<uint8_t> xGm_, outGm_;
    GlobalTensor<int64_t> indexGm_;
    PermuteTiling t_;
    int64_t rowBytes_ = 0, begin_ = 0, end_ = 0;
};

}  // namespace pangu

extern "C" __global__ __aicore__ void pangu_permute_count(GM_ADDR ids, GM_ADDR workspace, GM_ADDR tiling) {
    pangu::RunKernel<pangu::PermuteCount, pangu::PermuteTiling>(tiling, ids, workspace);
}

extern "C" __global__ __aicore__ void pangu_permute_scatter(GM_ADDR ids, GM_ADDR workspace, GM_ADDR groupSizes,
                                                            GM_ADDR sortedIndex, GM_ADDR tiling) {
    pangu::RunKernel<pangu::PermuteScatter, pangu::PermuteTiling>(tiling, ids, workspace, groupSizes, sortedIndex);
}

extern "C" __global__ __aicore__ void pangu_permute_gather(GM_ADDR x, GM_ADDR sortedIndex, GM_ADDR xSorted,
                                                           int64_t elemBytes, GM_ADDR tiling) {
    pangu::RunKernel<pangu::PermuteGather, pangu::PermuteTiling>(tiling, x, sortedIndex, xSorted, elemBytes);
}
