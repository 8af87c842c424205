// packed_weight: the AMX B tiles of an expert weight (grouped_amx's per-task packing, for every group
// and all of K and N at once), made once per weight version and kept while the weight lives and
// does not change.
//
// A row-major weight ([E, K, N]: pangu_ops' layout forward; transformers' [E, N, K] in the input
// gradient) has its pairs of rows interleaved into VNNI tiles for every product; per call that is
// a pass over the weight from memory that the tile work does not hide (30-40% of a Qwen3-MoE-shaped
// product). A weight whose columns are contiguous (transformers' forward, pangu_ops' input
// gradient) is read in place by the transposed product, which turns x's rows and the sums instead;
// its tiles (16 of its rows a tile, pairs of K as 32-bit words: one word transpose per 16 x 32)
// let the row-major product run it, 0.87-0.94x the time. Calls with the same weight (inference,
// micro-batches of one step, a benchmark) reuse one packed copy, made on a weight version's second
// use (the first packs per task or reads in place, as a training step whose weights change every
// step always does: its tiles then stay hot in L2): keyed by the weight's storage (held weakly: a
// freed weight's entry goes with it), offset, sizes, strides and autograd version counter (an
// optimizer's in-place update bumps it, and the next call packs again; the same memory in another
// layout is another entry), and checked against 16 of the weight's elements sampled when packed
// (writes through `.data`, which bypass the version counter, change them). The packed copies are
// capped by PANGU_OPS_CPU_PACK_CACHE_MB (default 2048, read when the extension loads; 0 turns the
// cache off), the least recently used going first; a weight over the cap is packed per call.
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <list>
#include <mutex>
#include <string>

#include "amx_grouped.h"
#include "common.h"

namespace pangu_cpu {

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
namespace {

constexpr int kSamples = 16;
constexpr size_t kMaxEntries = 256;  // weights seen, packed or not

struct Entry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  std::array<int64_t, 8> key;  // offset, E, K, N, the three strides, version (last)
  std::array<uint16_t, kSamples> samples;
  at::Tensor packed;
};

class PackCache {
 public:
  PackCache() {
    const char* env = std::getenv("PANGU_OPS_CPU_PACK_CACHE_MB");
    cap_ = static_cast<int64_t>(env ? std::stoull(env) : 2048) << 20;
  }

  static PackCache& get() {
    static PackCache cache;
    return cache;
  }

  at::Tensor find_or_pack(const at::Tensor& w, int64_t sbe, int64_t sb0, int64_t sb1, int64_t K, int64_t N) {
    const int64_t E = w.size(0), bytes = E * K * N * 2;
    if (bytes > cap_) return {};
    const std::array<int64_t, 8> key = {w.storage_offset(), E, K, N, sbe, sb0, sb1,
                                        static_cast<int64_t>(w.unsafeGetTensorImpl()->version_counter().current_version())};
    const auto* base = w.data_ptr<c10::BFloat16>();
    const std::array<uint16_t, kSamples> samples = sample(base, sbe, sb0, sb1, E, K, N);
    c10::StorageImpl* storage = w.storage().unsafeGetStorageImpl();
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = entries_.begin(); it != entries_.end();) {
        const bool gone = it->storage.expired(), mine = !gone && it->storage._unsafe_get_target() == storage;
        if (mine && it->key == key && it->samples == samples) {
          entries_.splice(entries_.begin(), entries_, it);  // most recently used first
          if (entries_.front().packed.defined()) {
            ++hits_;
            return entries_.front().packed;
          }
          break;  // seen once: packed below
        }
        if (gone || (mine && older(it->key, key))) {  // freed, or an older version of this weight
          bytes_ -= it->packed.defined() ? it->packed.nbytes() : 0;
          it = entries_.erase(it);
        } else {
          ++it;
        }
      }
      if (entries_.empty() || entries_.front().storage._unsafe_get_target() != storage || entries_.front().key != key) {
        // first sight of this weight version: remembered, not packed (a training step's weights
        // change every step, and its tasks' own packing keeps their tiles hot in L2)
        entries_.push_front({c10::weak_intrusive_ptr<c10::StorageImpl>(w.storage().getWeakStorageImpl()), key, samples, {}});
        while (entries_.size() > kMaxEntries && !entries_.back().packed.defined()) entries_.pop_back();
        return {};
      }
    }
    at::Tensor packed = empty_output({E * K * N}, w.options());
    c10::BFloat16* dst = packed.data_ptr<c10::BFloat16>();
    at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        if (sb0 == 1) {  // b_e's columns are rows of the weight: 16 of them a tile, pairs of K as words
          pack_rows(dst + e * K * N, base + e * sbe, sb1, N, K, true);
        } else {
          pack_columns(dst + e * K * N, base + e * sbe, sb0, 0, N, K, K);
        }
      }
    });
    const std::lock_guard<std::mutex> lock(mutex_);
    ++packs_;
    while (!entries_.empty() && bytes_ + bytes > cap_) {
      auto last = std::prev(entries_.end());
      bytes_ -= last->packed.defined() ? last->packed.nbytes() : 0;
      entries_.erase(last);
    }
    for (Entry& entry : entries_) {
      if (entry.storage._unsafe_get_target() == storage && entry.key == key && !entry.packed.defined()) {
        entry.packed = packed;
        bytes_ += bytes;
        return packed;
      }
    }
    return packed;  // its entry went meanwhile (another thread's weights): used once, not kept
  }

  std::vector<int64_t> stats(bool clear) {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (clear) entries_.clear(), bytes_ = 0;
    const int64_t packed = std::count_if(entries_.begin(), entries_.end(), [](const Entry& e) { return e.packed.defined(); });
    return {bytes_, packed, hits_, packs_};
  }

 private:
  // the key of another version of the same weight view (all but the version alike)
  static bool older(const std::array<int64_t, 8>& a, const std::array<int64_t, 8>& b) {
    return std::equal(a.begin(), a.end() - 1, b.begin());
  }

  // 16 elements spread over the weight (fixed positions: the same for the same shape)
  static std::array<uint16_t, kSamples> sample(const c10::BFloat16* w, int64_t sbe, int64_t sb0, int64_t sb1, int64_t E,
                                               int64_t K, int64_t N) {
    std::array<uint16_t, kSamples> out{};
    for (int i = 0; i < kSamples; ++i) {
      const int64_t e = E * i / kSamples, k = (K * (2 * i + 1) / (2 * kSamples)) % K, n = (N * 7 * i / kSamples) % N;
      out[i] = w[e * sbe + k * sb0 + n * sb1].x;
    }
    return out;
  }

  std::mutex mutex_;
  std::list<Entry> entries_;
  int64_t cap_ = 0, bytes_ = 0, hits_ = 0, packs_ = 0;
};

}  // namespace

at::Tensor packed_weight(const at::Tensor& w, int64_t sbe, int64_t sb0, int64_t sb1, int64_t K, int64_t N) {
  return PackCache::get().find_or_pack(w, sbe, sb0, sb1, K, N);
}

std::vector<int64_t> pack_cache_stats(bool clear) { return PackCache::get().stats(clear); }
#else
at::Tensor packed_weight(const at::Tensor&, int64_t, int64_t, int64_t, int64_t, int64_t) { return {}; }
std::vector<int64_t> pack_cache_stats(bool) { return {0, 0, 0, 0}; }
#endif

TORCH_LIBRARY_FRAGMENT(pangu_cpu, m) {
  m.def("pack_cache(bool clear) -> int[]", [](bool clear) { return pack_cache_stats(clear); });
  m.def("packed_kernels() -> bool", [] { return packed_kernels(); });
}

}  // namespace pangu_cpu
