// empty_output: the large outputs of the CPU kernels come from a small caching pool.
//
// glibc serves allocations of 32 MiB and more (the permuted rows of a 2k-token top-8 batch, the
// expert outputs, their gradients) with a fresh mmap each time and unmaps them when freed, so every
// such output pays a page fault per 4 KiB page on first write: measured here (a 2-core VM) a fresh
// 32 MiB output costs 8 ms to fill against 1.3 ms for the same copy into reused memory. The pool
// keeps the blocks of freed outputs (up to PANGU_OPS_CPU_OUTPUT_CACHE_MB, default 1024; 0 turns the
// cache off) and hands them to the next output of about the same size, as CUDA's caching allocator
// does for device memory. Fresh blocks are 2 MiB-aligned and ask for transparent huge pages.
#include <torch/library.h>
#include <ATen/EmptyTensor.h>

#include <sys/mman.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#include "common.h"

namespace pangu_cpu {
namespace {

constexpr size_t kHuge = size_t{2} << 20;
constexpr size_t kPooledBytes = size_t{1} << 20;  // smaller outputs: the default allocator is fine

struct Block {
  void* ptr;
  size_t size;
};

class OutputPool final : public c10::Allocator {
 public:
  OutputPool() {
    const char* env = std::getenv("PANGU_OPS_CPU_OUTPUT_CACHE_MB");
    cap_ = (env ? std::stoull(env) : 1024) << 20;
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t size = (std::max<size_t>(n, 1) + kHuge - 1) / kHuge * kHuge;
    Block* block = take(size);
    if (block == nullptr) {
      void* p = nullptr;
      TORCH_CHECK(posix_memalign(&p, kHuge, size) == 0 && p != nullptr, "pangu_ops: out of memory allocating ",
                  size, " bytes");
#ifdef MADV_HUGEPAGE  // Linux; advisory: ignored where THP is off
      madvise(p, size, MADV_HUGEPAGE);
#endif
      block = new Block{p, size};
    }
    return {block->ptr, block, &OutputPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  std::vector<int64_t> stats(bool clear) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (clear) {
      for (auto& [size, block] : free_) {
        std::free(block->ptr);
        delete block;
      }
      free_.clear();
      cached_ = 0;
    }
    return {static_cast<int64_t>(cached_), reused_, fresh_};
  }

  static OutputPool& get() {
    static OutputPool* pool = new OutputPool();  // never destroyed: outputs may outlive static teardown
    return *pool;
  }

 private:
  // A cached block of at least `size` bytes and at most a quarter more, or nullptr.
  Block* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.lower_bound(size);
    if (it == free_.end() || it->first > size + size / 4) {
      ++fresh_;
      return nullptr;
    }
    Block* block = it->second;
    free_.erase(it);
    cached_ -= block->size;
    ++reused_;
    return block;
  }

  static void release(void* ctx) {
    Block* block = static_cast<Block*>(ctx);
    OutputPool& pool = get();
    {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      if (pool.cached_ + block->size <= pool.cap_) {
        pool.free_.emplace(block->size, block);
        pool.cached_ += block->size;
        return;
      }
    }
    std::free(block->ptr);
    delete block;
  }

  std::mutex mutex_;
  std::multimap<size_t, Block*> free_;
  size_t cap_ = 0, cached_ = 0;
  int64_t reused_ = 0, fresh_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(sizes);
  if (numel * static_cast<int64_t>(options.dtype().itemsize()) < static_cast<int64_t>(kPooledBytes)) {
    return at::empty(sizes, options);
  }
  return at::detail::empty_generic(sizes, &OutputPool::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), c10::MemoryFormat::Contiguous);
}

void fill_streaming(void* p, int64_t bytes, uint8_t value) {
  char* const begin = static_cast<char*>(p);
  if (bytes < static_cast<int64_t>(kPooledBytes)) {
    std::memset(begin, value, bytes);
    return;
  }
  at::parallel_for(0, (bytes + 63) / 64, 4096, [&](int64_t l0, int64_t l1) {
    stream_fill(begin + 64 * l0, begin + std::min<int64_t>(64 * l1, bytes), value);
  });
}

// [cached bytes, outputs served from the cache, fresh blocks]; clear=True frees the cached blocks.
TORCH_LIBRARY_FRAGMENT(pangu_cpu, m) {
  m.def("output_cache(bool clear) -> int[]", [](bool clear) { return OutputPool::get().stats(clear); });
}

}  // namespace pangu_cpu
