// pangu_ops AscendC CPU twin: a small, checking CPU implementation of the subset of the AscendC
// kernel API that pangu_ops' kernels use, written from the documented semantics (not from CANN's
// headers), so that the unchanged kernel sources compile with g++ and run on a CPU.
//
// What it models: AI cores (the launcher runs blocks 0..blockDim-1 one after another, GetBlockIdx
// tells which), Unified Buffer capacity (TPipe::InitBuffer fails beyond UB_BYTES), 32-byte
// alignment of UB buffers and of DataCopy lengths (DataCopyPad for the rest), queue semantics
// (AllocTensor beyond the buffers given, EnQue beyond the depth, DeQue of an empty queue and
// FreeTensor of a tensor not allocated all abort), vector-op operand bounds, round-to-nearest-even
// casts. What it does not: the pipeline's timing, the cube's fractal layouts (see lib/matmul_intf.h),
// or whether the Ascend compiler accepts the code.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <type_traits>
#include <vector>

#define __aicore__
#define __global__
#define __gm__
#define GM_ADDR uint8_t*

namespace twin {
[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "AscendC CPU twin: %s\n", what);
    std::fflush(stderr);
    std::abort();
}
inline void check(bool ok, const char* what) { if (!ok) fail(what); }
constexpr int64_t UB_BYTES = 192 * 1024;  // Ascend 910B AI core Unified Buffer
constexpr int64_t BLOCK_BYTES = 32;       // DataCopy unit and UB alignment
struct Core { int64_t idx = 0, num = 1; };
inline Core& core() { static thread_local Core c; return c; }
inline uint16_t round_bits(float f, int shift) {  // fp32 -> upper 16 bits, round to nearest even
    uint32_t u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> shift) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> shift);
}
}  // namespace twin

struct bfloat16_t {
    uint16_t bits = 0;
    bfloat16_t() = default;
    bfloat16_t(float f) : bits(twin::round_bits(f, 16)) {}
    operator float() const { uint32_t u = uint32_t(bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
struct half {
    uint16_t bits = 0;
    half() = default;
    half(float f) { _Float16 h = static_cast<_Float16>(f); std::memcpy(&bits, &h, 2); }
    operator float() const { _Float16 h; std::memcpy(&h, &bits, 2); return static_cast<float>(h); }
};

namespace AscendC {

inline int64_t GetBlockIdx() { return twin::core().idx; }
inline int64_t GetBlockNum() { return twin::core().num; }

enum class TPosition { GM, VECIN, VECOUT, VECCALC, A1, B1, C1, CO2 };
enum class RoundMode { CAST_NONE, CAST_RINT, CAST_ROUND, CAST_FLOOR, CAST_CEIL, CAST_TRUNC };
enum class HardEvent { MTE2_S, S_MTE2, V_MTE3, MTE3_V };

template <typename T>
class GlobalTensor {
  public:
    void SetGlobalBuffer(__gm__ T* addr, uint64_t size = 0) { addr_ = addr; size_ = size; }
    GlobalTensor operator[](uint64_t offset) const {
        GlobalTensor t; t.addr_ = addr_ + offset; t.size_ = size_ > offset ? size_ - offset : 0; return t;
    }
    T GetValue(uint64_t i) const { bound(i); return addr_[i]; }
    void SetValue(uint64_t i, T v) { bound(i); addr_[i] = v; }
    T* GetPhyAddr() const { return addr_; }
    uint64_t GetSize() const { return size_; }
  private:
    void bound(uint64_t i) const { twin::check(size_ == 0 || i < size_, "GlobalTensor access beyond SetGlobalBuffer's size"); }
    T* addr_ = nullptr;
    uint64_t size_ = 0;
};

template <typename T>
class LocalTensor {
  public:
    LocalTensor() = default;
    LocalTensor(T* addr, int64_t len, void* owner) : addr_(addr), len_(len), owner_(owner) {}
    T GetValue(int64_t i) const { bound(i, 1); return addr_[i]; }
    void SetValue(int64_t i, T v) { bound(i, 1); addr_[i] = v; }
    LocalTensor operator[](int64_t offset) const {
        bound(offset, 0); return LocalTensor(addr_ + offset, len_ - offset, owner_);
    }
    template <typename U> LocalTensor<U> ReinterpretCast() const {
        return LocalTensor<U>(reinterpret_cast<U*>(addr_), len_ * int64_t(sizeof(T)) / int64_t(sizeof(U)), owner_);
    }
    int64_t GetSize() const { return len_; }
    // twin-only accessors used by the API functions below
    T* data() const { return addr_; }
    void bound(int64_t i, int64_t n) const {
        twin::check(addr_ != nullptr, "LocalTensor used before it was allocated");
        twin::check(i >= 0 && i + n <= len_, "LocalTensor access beyond its buffer");
    }
    void* owner() const { return owner_; }
  private:
    T* addr_ = nullptr;
    int64_t len_ = 0;
    void* owner_ = nullptr;
};

class TPipe;

// A queue of `num` buffers of `len` bytes (TPipe::InitBuffer), holding at most `depth` tensors.
class TQueBase {
  public:
    void init(TPipe* pipe, int32_t num, uint32_t len, int32_t depth);
  protected:
    template <typename T> LocalTensor<T> alloc() {
        for (size_t i = 0; i < busy_.size(); ++i)
            if (!busy_[i]) { busy_[i] = true; return LocalTensor<T>(reinterpret_cast<T*>(bufs_[i]), len_ / sizeof(T), this); }
        twin::fail("AllocTensor: every buffer of the queue is in use (FreeTensor missing, or too few buffers)");
    }
    template <typename T> void free(const LocalTensor<T>& t) {
        for (size_t i = 0; i < busy_.size(); ++i)
            if (bufs_[i] == reinterpret_cast<uint8_t*>(t.data())) {
                twin::check(busy_[i], "FreeTensor of a buffer that is not allocated"); busy_[i] = false; return;
            }
        twin::fail("FreeTensor of a tensor that does not belong to this queue");
    }
    std::vector<uint8_t*> bufs_;
    std::vector<bool> busy_;
    std::deque<uint8_t*> queued_;
    uint32_t len_ = 0;
    int32_t depth_ = 1;
};

template <TPosition pos, int32_t depth = 1>
class TQue : public TQueBase {
  public:
    template <typename T> LocalTensor<T> AllocTensor() { return alloc<T>(); }
    template <typename T> void FreeTensor(const LocalTensor<T>& t) { free(t); }
    template <typename T> bool EnQue(const LocalTensor<T>& t) {
        twin::check(int32_t(queued_.size()) < depth, "EnQue beyond the queue's depth");
        queued_.push_back(reinterpret_cast<uint8_t*>(t.data())); return true;
    }
    template <typename T> LocalTensor<T> DeQue() {
        twin::check(!queued_.empty(), "DeQue of an empty queue");
        uint8_t* p = queued_.front(); queued_.pop_front();
        return LocalTensor<T>(reinterpret_cast<T*>(p), len_ / sizeof(T), this);
    }
    static constexpr int32_t kDepth = depth;
};

// A queue whose tensors move from one position to another without a compute stage (e.g. GM ->
// VECIN -> GM): the twin treats it as a TQue.
template <TPosition src, TPosition dst, int32_t depth = 1>
class TQueBind : public TQue<src, depth> {};

template <TPosition pos>
class TBuf {
  public:
    template <typename T> LocalTensor<T> Get() { return LocalTensor<T>(reinterpret_cast<T*>(buf_), len_ / sizeof(T), this); }
    template <typename T> LocalTensor<T> Get(uint32_t count) {
        twin::check(count * sizeof(T) <= len_, "TBuf::Get beyond the buffer"); return LocalTensor<T>(reinterpret_cast<T*>(buf_), count, this);
    }
    uint8_t* buf_ = nullptr;
    uint32_t len_ = 0;
};

// The AI core's Unified Buffer, handed out by InitBuffer in 32-byte aligned pieces.
class TPipe {
  public:
    TPipe() : ub_(twin::UB_BYTES + twin::BLOCK_BYTES) {}
    template <TPosition pos, int32_t depth>
    void InitBuffer(TQue<pos, depth>& que, int32_t num, uint32_t len) {
        init_queue(que, num, len, depth);
    }
    template <TPosition src, TPosition dst, int32_t depth>
    void InitBuffer(TQueBind<src, dst, depth>& que, int32_t num, uint32_t len) {
        init_queue(que, num, len, depth);
    }
    void init_queue(TQueBase& que, int32_t num, uint32_t len, int32_t depth) {
        twin::check(num >= 1 && depth >= 1 && depth <= num, "InitBuffer: a queue needs 1 <= depth <= num buffers");
        que.init(this, num, len, depth);
    }
    template <TPosition pos> void InitBuffer(TBuf<pos>& buf, uint32_t len) { buf.buf_ = take(len); buf.len_ = len; }
    uint8_t* take(uint32_t len) {
        uint32_t rounded = (len + twin::BLOCK_BYTES - 1) / twin::BLOCK_BYTES * twin::BLOCK_BYTES;
        if (used_ + rounded > twin::UB_BYTES) twin::fail("InitBuffer: the Unified Buffer (192 KiB) is over-full");
        uint8_t* base = ub_.data() + (twin::BLOCK_BYTES - reinterpret_cast<uintptr_t>(ub_.data()) % twin::BLOCK_BYTES) % twin::BLOCK_BYTES;
        uint8_t* p = base + used_;
        used_ += rounded;
        return p;
    }
  private:
    std::vector<uint8_t> ub_;
    int64_t used_ = 0;
};

inline void TQueBase::init(TPipe* pipe, int32_t num, uint32_t len, int32_t depth) {
    twin::check(len % twin::BLOCK_BYTES == 0, "InitBuffer: queue buffer length must be a multiple of 32 bytes");
    for (int32_t i = 0; i < num; ++i) { bufs_.push_back(pipe->take(len)); busy_.push_back(false); }
    len_ = len; depth_ = depth;
}

// ---- data movement ----
template <typename T> void ub_aligned(const LocalTensor<T>& t) {
    twin::check(reinterpret_cast<uintptr_t>(t.data()) % twin::BLOCK_BYTES == 0, "UB operand address not 32-byte aligned");
}
// DataCopy moves whole 32-byte blocks: count * sizeof(T) must be a multiple of 32.
template <typename T> void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, uint32_t count) {
    twin::check(count * sizeof(T) % twin::BLOCK_BYTES == 0, "DataCopy GM->UB of a length that is not a multiple of 32 bytes (use DataCopyPad)");
    ub_aligned(dst); dst.bound(0, count); std::memcpy(dst.data(), src.GetPhyAddr(), count * sizeof(T));
}
template <typename T> void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, uint32_t count) {
    twin::check(count * sizeof(T) % twin::BLOCK_BYTES == 0, "DataCopy UB->GM of a length that is not a multiple of 32 bytes (use DataCopyPad)");
    ub_aligned(src); src.bound(0, count); std::memcpy(dst.GetPhyAddr(), src.data(), count * sizeof(T));
}
template <typename T> void DataCopy(const LocalTensor<T>& dst, const LocalTensor<T>& src, uint32_t count) {
    twin::check(count * sizeof(T) % twin::BLOCK_BYTES == 0, "DataCopy UB->UB of a length that is not a multiple of 32 bytes");
    ub_aligned(dst); ub_aligned(src); dst.bound(0, count); src.bound(0, count);
    std::memmove(dst.data(), src.data(), count * sizeof(T));
}

struct DataCopyExtParams {
    uint16_t blockCount = 1;  // rows
    uint32_t blockLen = 0;    // bytes per row
    uint32_t srcStride = 0;   // gap between rows: bytes on GM, 32-byte blocks on UB
    uint32_t dstStride = 0;
    uint32_t rsv = 0;
};
template <typename T> struct DataCopyPadExtParams {
    bool isPad = false;
    uint8_t leftPadding = 0, rightPadding = 0;
    T paddingValue = T();
};
// GM -> UB of rows of any byte length; each row lands 32-byte aligned in UB.
template <typename T>
void DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const DataCopyExtParams& p,
                 const DataCopyPadExtParams<T>&) {
    ub_aligned(dst);
    uint32_t row_ub = (p.blockLen + twin::BLOCK_BYTES - 1) / twin::BLOCK_BYTES * twin::BLOCK_BYTES;
    const uint8_t* s = reinterpret_cast<const uint8_t*>(src.GetPhyAddr());
    uint8_t* d = reinterpret_cast<uint8_t*>(dst.data());
    twin::check(int64_t(p.blockCount) * (row_ub + p.dstStride * twin::BLOCK_BYTES) <= dst.GetSize() * int64_t(sizeof(T)) + p.dstStride * twin::BLOCK_BYTES,
                "DataCopyPad GM->UB beyond the destination buffer");
    for (uint16_t r = 0; r < p.blockCount; ++r) {
        std::memcpy(d, s, p.blockLen);
        s += p.blockLen + p.srcStride;
        d += row_ub + p.dstStride * twin::BLOCK_BYTES;
    }
}
// UB -> GM of rows of any byte length.
template <typename T>
void DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyExtParams& p) {
    ub_aligned(src);
    uint32_t row_ub = (p.blockLen + twin::BLOCK_BYTES - 1) / twin::BLOCK_BYTES * twin::BLOCK_BYTES;
    twin::check(int64_t(p.blockCount) * row_ub <= src.GetSize() * int64_t(sizeof(T)) + int64_t(p.blockCount) * p.srcStride * twin::BLOCK_BYTES,
                "DataCopyPad UB->GM beyond the source buffer");
    const uint8_t* s = reinterpret_cast<const uint8_t*>(src.data());
    uint8_t* d = reinterpret_cast<uint8_t*>(dst.GetPhyAddr());
    for (uint16_t r = 0; r < p.blockCount; ++r) {
        std::memcpy(d, s, p.blockLen);
        s += row_ub + p.srcStride * twin::BLOCK_BYTES;
        d += p.blockLen + p.dstStride;
    }
}

// ---- vector unit (level-2 API: `count` elements from the operands' starts) ----
template <typename T> void Duplicate(const LocalTensor<T>& dst, const T& value, int32_t count) {
    ub_aligned(dst); dst.bound(0, count);
    for (int32_t i = 0; i < count; ++i) dst.data()[i] = value;
}
template <typename D, typename S> void Cast(const LocalTensor<D>& dst, const LocalTensor<S>& src, RoundMode, uint32_t count) {
    ub_aligned(dst); ub_aligned(src); dst.bound(0, count); src.bound(0, count);
    for (uint32_t i = 0; i < count; ++i) dst.data()[i] = D(float(src.data()[i]));  // to half/bf16: nearest even
}
template <typename T> void Muls(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& s, int32_t count) {
    ub_aligned(dst); ub_aligned(src); dst.bound(0, count); src.bound(0, count);
    for (int32_t i = 0; i < count; ++i) dst.data()[i] = src.data()[i] * s;
}
template <typename T> void Adds(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& s, int32_t count) {
    ub_aligned(dst); ub_aligned(src); dst.bound(0, count); src.bound(0, count);
    for (int32_t i = 0; i < count; ++i) dst.data()[i] = src.data()[i] + s;
}
// dst = src * scalar + dst (multiply, then add: two roundings)
template <typename T, typename U> void Axpy(const LocalTensor<T>& dst, const LocalTensor<U>& src, const U& s, int32_t count) {
    ub_aligned(dst); ub_aligned(src); dst.bound(0, count); src.bound(0, count);
    for (int32_t i = 0; i < count; ++i) { volatile T prod = T(src.data()[i] * s); dst.data()[i] = dst.data()[i] + prod; }
}

// Pipeline synchronisation: the twin runs stages in program order, so these only check usage.
template <HardEvent e> void SetFlag(int32_t) {}
template <HardEvent e> void WaitFlag(int32_t) {}
template <int pipe> void PipeBarrier() {}
constexpr int PIPE_ALL = 0, PIPE_V = 1, PIPE_MTE2 = 2, PIPE_MTE3 = 3;

inline GM_ADDR& sys_workspace() { static GM_ADDR w = nullptr; return w; }
inline void SetSysWorkspace(GM_ADDR w) { sys_workspace() = w; }
inline GM_ADDR GetSysWorkSpacePtr() { return sys_workspace(); }

}  // namespace AscendC

namespace twin {
// Runs kernel(args...) on blocks 0..blocks-1, one after another, as the AI cores would in parallel.
template <typename F, typename... Args> void launch(int64_t blocks, F kernel, Args... args) {
    core().num = blocks;
    for (int64_t b = 0; b < blocks; ++b) { core().idx = b; kernel(args...); }
    core() = Core{};
}
}  // namespace twin
