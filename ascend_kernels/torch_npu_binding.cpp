// torch_npu binding of pangu_ops' AscendC kernels: one op per kernel in namespace pangu_npu
// (PrivateUse1 = NPU tensors), each filling the kernel's tiling struct, copying it to the device
// and launching on the current NPU stream. The ops' host logic (checks, allocation, launch order)
// is pangu_ops/ascend.py, shared with the CPU twin; these are only the launches.
#include <torch/extension.h>
#include <torch/library.h>

#include "acl/acl.h"
#include "aclrtlaunch_pangu_grouped_gemm_bfloat16.h"
#include "aclrtlaunch_pangu_grouped_gemm_float.h"
#include "aclrtlaunch_pangu_grouped_gemm_half.h"
#include "aclrtlaunch_pangu_permute_count.h"
#include "aclrtlaunch_pangu_permute_gather.h"
#include "aclrtlaunch_pangu_permute_scatter.h"
#include "aclrtlaunch_pangu_unpermute_inverse.h"
#include "aclrtlaunch_pangu_unpermute_reduce_bfloat16.h"
#include "aclrtlaunch_pangu_unpermute_reduce_float.h"
#include "aclrtlaunch_pangu_unpermute_reduce_half.h"
#include "common.h"
#include "platform/platform_ascendc.h"
#include "tiling/tiling_api.h"
#include "torch_npu/csrc/core/npu/NPUStream.h"

namespace {

using at::Tensor;

void* ptr(const Tensor& t) { return t.defined() ? const_cast<void*>(t.data_ptr()) : nullptr; }

// The tiling struct as a device tensor (kernels read it from GM).
template <typename T>
Tensor device_tiling(const T& tiling, const Tensor& like) {
    auto host = at::empty({int64_t(sizeof(T))}, at::kByte);
    std::memcpy(host.data_ptr(), &tiling, sizeof(T));
    return host.to(like.device(), /*non_blocking=*/false);
}

aclrtStream stream() { return c10_npu::getCurrentNPUStream().stream(); }

int64_t vector_core_num() {
    return platform_ascendc::PlatformAscendCManager::GetInstance()->GetCoreNumAiv();
}

void permute_count(int64_t blocks, Tensor ids, Tensor ws, int64_t T, int64_t k, int64_t E) {
    pangu::PermuteTiling t{T, k, E, 0, 0, blocks};
    auto tiling = device_tiling(t, ids);
    ACLRT_LAUNCH_KERNEL(pangu_permute_count)(blocks, stream(), ptr(ids), ptr(ws), ptr(tiling));
}

void permute_scatter(int64_t blocks, Tensor ids, Tensor ws, Tensor sizes, Tensor index, int64_t T, int64_t k,
                     int64_t E, int64_t rows) {
    pangu::PermuteTiling t{T, k, E, 0, rows, blocks};
    auto tiling = device_tiling(t, ids);
    ACLRT_LAUNCH_KERNEL(pangu_permute_scatter)(blocks, stream(), ptr(ids), ptr(ws), ptr(sizes), ptr(index), ptr(tiling));
}

void permute_gather(int64_t blocks, Tensor x, Tensor index, Tensor out, int64_t T, int64_t k, int64_t H, int64_t rows,
                    int64_t elem_bytes) {
    pangu::PermuteTiling t{T, k, 0, H, rows, blocks};
    auto tiling = device_tiling(t, x);
    ACLRT_LAUNCH_KERNEL(pangu_permute_gather)(blocks, stream(), ptr(x), ptr(index), ptr(out), elem_bytes, ptr(tiling));
}

void unpermute_inverse(int64_t blocks, Tensor index, Tensor inverse, int64_t T, int64_t k, int64_t rows) {
    pangu::UnpermuteTiling t{T, k, 0, rows, blocks, 0};
    auto tiling = device_tiling(t, index);
    ACLRT_LAUNCH_KERNEL(pangu_unpermute_inverse)(blocks, stream(), ptr(index), ptr(inverse), ptr(tiling));
}

void unpermute_reduce(int64_t blocks, int64_t dtype, Tensor y_sorted, Tensor inverse, c10::optional<Tensor> weights,
                      Tensor y, int64_t T, int64_t k, int64_t H, int64_t rows) {
    Tensor w = weights.has_value() ? *weights : Tensor();
    pangu::UnpermuteTiling t{T, k, H, rows, blocks, w.defined()};
    auto tiling = device_tiling(t, y);
    if (dtype == 0) ACLRT_LAUNCH_KERNEL(pangu_unpermute_reduce_float)(blocks, stream(), ptr(y_sorted), ptr(inverse), ptr(w), ptr(y), ptr(tiling));
    else if (dtype == 1) ACLRT_LAUNCH_KERNEL(pangu_unpermute_reduce_half)(blocks, stream(), ptr(y_sorted), ptr(inverse), ptr(w), ptr(y), ptr(tiling));
    else ACLRT_LAUNCH_KERNEL(pangu_unpermute_reduce_bfloat16)(blocks, stream(), ptr(y_sorted), ptr(inverse), ptr(w), ptr(y), ptr(tiling));
}

// Matmul tiling for one full output tile (tile_m x tile_n, reduction k); remainders shrink it with
// SetSingleShape in the kernel.
void cube_tiling(TCubeTiling& cube, int64_t dtype, int64_t m, int64_t n, int64_t k, bool trans_a, bool trans_b) {
    auto platform = platform_ascendc::PlatformAscendCManager::GetInstance();
    matmul_tiling::MatmulApiTiling api(*platform);
    auto dt = dtype == 0 ? matmul_tiling::DataType::DT_FLOAT
              : dtype == 1 ? matmul_tiling::DataType::DT_FLOAT16 : matmul_tiling::DataType::DT_BF16;
    api.SetAType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, dt, trans_a);
    api.SetBType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, dt, trans_b);
    api.SetCType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, dt);
    api.SetShape(m, n, k);
    api.SetOrgShape(m, n, k);
    api.SetBias(false);
    api.SetBufferSpace(-1, -1, -1);
    TORCH_CHECK(api.GetTiling(cube) != -1, "pangu_npu: Matmul tiling failed for ", m, "x", n, "x", k);
}

void grouped_gemm(int64_t blocks, int64_t dtype, Tensor a, Tensor b, Tensor sizes, Tensor c, int64_t E, int64_t rows,
                  int64_t K, int64_t N, int64_t tile_m, int64_t tile_n, int64_t trans_b, int64_t wgrad) {
    pangu::GroupedGemmTiling t{E, rows, K, N, tile_m, tile_n, trans_b, wgrad, blocks, TCubeTiling{}};
    // wgrad's reduction is a group's rows (unknown on the host without a sync): tile for all rows
    cube_tiling(t.cube, dtype, std::min(tile_m, wgrad ? K : rows), std::min(tile_n, N), wgrad ? rows : K,
                bool(wgrad), bool(trans_b));
    auto tiling = device_tiling(t, a);
    auto workspace = at::empty({int64_t(platform_ascendc::PlatformAscendCManager::GetInstance()->GetLibApiWorkSpaceSize())},
                               a.options().dtype(at::kByte));
    if (dtype == 0) ACLRT_LAUNCH_KERNEL(pangu_grouped_gemm_float)(blocks, stream(), ptr(a), ptr(b), ptr(sizes), ptr(c), ptr(workspace), ptr(tiling));
    else if (dtype == 1) ACLRT_LAUNCH_KERNEL(pangu_grouped_gemm_half)(blocks, stream(), ptr(a), ptr(b), ptr(sizes), ptr(c), ptr(workspace), ptr(tiling));
    else ACLRT_LAUNCH_KERNEL(pangu_grouped_gemm_bfloat16)(blocks, stream(), ptr(a), ptr(b), ptr(sizes), ptr(c), ptr(workspace), ptr(tiling));
}

}  // namespace

TORCH_LIBRARY(pangu_npu, m) {
    m.def("vector_core_num() -> int");
    m.def("permute_count(int blocks, Tensor ids, Tensor(a!) ws, int T, int k, int E) -> ()");
    m.def("permute_scatter(int blocks, Tensor ids, Tensor ws, Tensor(a!) sizes, Tensor(b!) index, int T, int k, int E, int rows) -> ()");
    m.def("permute_gather(int blocks, Tensor x, Tensor index, Tensor(a!) out, int T, int k, int H, int rows, int elem_bytes) -> ()");
    m.def("unpermute_inverse(int blocks, Tensor index, Tensor(a!) inverse, int T, int k, int rows) -> ()");
    m.def("unpermute_reduce(int blocks, int dtype, Tensor y_sorted, Tensor inverse, Tensor? weights, Tensor(a!) y, int T, int k, int H, int rows) -> ()");
    m.def("grouped_gemm(int blocks, int dtype, Tensor a, Tensor b, Tensor sizes, Tensor(a!) c, int E, int rows, int K, int N, int tile_m, int tile_n, int trans_b, int wgrad) -> ()");
    m.impl("vector_core_num", &vector_core_num);
}

TORCH_LIBRARY_IMPL(pangu_npu, PrivateUse1, m) {
    m.impl("permute_count", &permute_count);
    m.impl("permute_scatter", &permute_scatter);
    m.impl("permute_gather", &permute_gather);
    m.impl("unpermute_inverse", &unpermute_inverse);
    m.impl("unpermute_reduce", &unpermute_reduce);
    m.impl("grouped_gemm", &grouped_gemm);
}
