// pangu_ops AscendC CPU twin: the high-level Matmul API as a plain GEMM. The cube unit's tiling
// (TCubeTiling: base blocks, L1/L0 depths) only schedules the hardware; the result it must
// produce is C[singleM, singleN] = op(A)[singleM, singleK] @ op(B)[singleK, singleN] with fp32
// accumulation, rounded to C's type, on ND matrices whose row lengths SetOrgShape gives.
#pragma once
#include "../kernel_operator.h"

enum class CubeFormat { ND, NZ };

namespace matmul {
template <AscendC::TPosition pos, CubeFormat format, typename T> struct MatmulType { using Type = T; };

template <typename A, typename B, typename C, typename Bias>
class Matmul {
    using TA = typename A::Type;
    using TB = typename B::Type;
    using TC = typename C::Type;
  public:
    void SetOrgShape(int orgM, int orgN, int orgKa, int orgKb, int orgKc = 0) {
        orgM_ = orgM; orgN_ = orgN; orgKa_ = orgKa; orgKb_ = orgKb; (void)orgKc;
    }
    void SetOrgShape(int orgM, int orgN, int orgK) { SetOrgShape(orgM, orgN, orgK, orgK); }
    void SetSingleShape(int m, int n, int k) { m_ = m; n_ = n; k_ = k; }
    void SetTensorA(const AscendC::GlobalTensor<TA>& a, bool transpose = false) { a_ = a; ta_ = transpose; }
    void SetTensorB(const AscendC::GlobalTensor<TB>& b, bool transpose = false) { b_ = b; tb_ = transpose; }
    void IterateAll(const AscendC::GlobalTensor<TC>& c, uint8_t enAtomic = 0) {
        twin::check(m_ > 0 && n_ > 0 && k_ > 0, "Matmul: SetSingleShape needs positive m, n, k");
        twin::check(enAtomic == 0, "Matmul twin: atomic accumulation is not modelled");
        // row-major storage: A is [orgM, orgKa] (or [orgKa, orgM] transposed), B [orgKb, orgN] (or [orgN, orgKb])
        const int64_t lda = ta_ ? orgM_ : orgKa_, ldb = tb_ ? orgKb_ : orgN_, ldc = orgN_;
        std::vector<float> acc(size_t(m_) * n_, 0.0f);
        for (int i = 0; i < m_; ++i)
            for (int p = 0; p < k_; ++p) {
                float a = float(a_.GetPhyAddr()[ta_ ? p * lda + i : i * lda + p]);
                for (int j = 0; j < n_; ++j)
                    acc[size_t(i) * n_ + j] += a * float(b_.GetPhyAddr()[tb_ ? j * ldb + p : p * ldb + j]);
            }
        for (int i = 0; i < m_; ++i)
            for (int j = 0; j < n_; ++j) c.GetPhyAddr()[i * ldc + j] = TC(acc[size_t(i) * n_ + j]);
    }
    void End() {}
  private:
    AscendC::GlobalTensor<TA> a_;
    AscendC::GlobalTensor<TB> b_;
    bool ta_ = false, tb_ = false;
    int orgM_ = 0, orgN_ = 0, orgKa_ = 0, orgKb_ = 0, m_ = 0, n_ = 0, k_ = 0;
};
}  // namespace matmul

#define REGIST_MATMUL_OBJ(pipe, workspace, mm, tiling) ((void)(pipe), (void)(workspace), (void)(tiling))
