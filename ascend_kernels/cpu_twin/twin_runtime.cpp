// The CPU twin's launchers: the kernel sources, compiled unchanged against the twin API, and one
// C entry per kernel that fills its tiling struct and runs it on `blocks` emulated AI cores.
// pangu_ops/ascend.py calls these through ctypes, exactly where torch_npu_binding.cpp launches
// the same kernels on an NPU.
#include "../permute.cpp"
#include "../unpermute.cpp"
#include "../grouped_gemm.cpp"

#define G(p) reinterpret_cast<GM_ADDR>(p)

extern "C" {

void twin_permute_count(int64_t blocks, void* ids, void* ws, int64_t T, int64_t k, int64_t E) {
    pangu::PermuteTiling t{T, k, E, 0, 0, blocks};
    twin::launch(blocks, pangu_permute_count, G(ids), G(ws), G(&t));
}

void twin_permute_scatter(int64_t blocks, void* ids, void* ws, void* sizes, void* index, int64_t T, int64_t k,
                          int64_t E, int64_t rows) {
    pangu::PermuteTiling t{T, k, E, 0, rows, blocks};
    twin::launch(blocks, pangu_permute_scatter, G(ids), G(ws), G(sizes), G(index), G(&t));
}

void twin_permute_gather(int64_t blocks, void* x, void* index, void* out, int64_t T, int64_t k, int64_t H,
                         int64_t rows, int64_t elem_bytes) {
    pangu::PermuteTiling t{T, k, 0, H, rows, blocks};
    twin::launch(blocks, pangu_permute_gather, G(x), G(index), G(out), elem_bytes, G(&t));
}

void twin_unpermute_inverse(int64_t blocks, void* index, void* inverse, int64_t T, int64_t k, int64_t rows) {
    pangu::UnpermuteTiling t{T, k, 0, rows, blocks, 0};
    twin::launch(blocks, pangu_unpermute_inverse, G(index), G(inverse), G(&t));
}

void twin_unpermute_reduce(int64_t blocks, int64_t dtype, void* y_sorted, void* inverse, void* weights, void* y,
                           int64_t T, int64_t k, int64_t H, int64_t rows) {
    pangu::UnpermuteTiling t{T, k, H, rows, blocks, weights != nullptr};
    auto kernel = dtype == 0 ? pangu_unpermute_reduce_float : dtype == 1 ? pangu_unpermute_reduce_half
                                                                         : pangu_unpermute_reduce_bfloat16;
    twin::launch(blocks, kernel, G(y_sorted), G(inverse), G(weights), G(y), G(&t));
}

void twin_grouped_gemm(int64_t blocks, int64_t dtype, void* a, void* b, void* sizes, void* c, int64_t E, int64_t rows,
                       int64_t K, int64_t N, int64_t tile_m, int64_t tile_n, int64_t trans_b, int64_t wgrad) {
    pangu::GroupedGemmTiling t{E, rows, K, N, tile_m, tile_n, trans_b, wgrad, blocks, TCubeTiling{}};
    auto kernel = dtype == 0 ? pangu_grouped_gemm_float : dtype == 1 ? pangu_grouped_gemm_half
                                                                     : pangu_grouped_gemm_bfloat16;
    twin::launch(blocks, kernel, G(a), G(b), G(sizes), G(c), static_cast<GM_ADDR>(nullptr), G(&t));
}

}  // extern "C"
