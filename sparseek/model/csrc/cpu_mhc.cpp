// mHC's Sinkhorn projection on the CPU: one doubly-stochastic S x S matrix per token.
//
// comb = softmax(logits, rows) + eps, then columns and rows normalized in turn (v4.sinkhorn is the
// reference). Why by hand: each normalization is a reduction over 4 entries, and inductor emits
// one parallel loop per reduction, ~40 per call, each ending in a thread barrier, for a 128-token
// prompt whose matrices hold 8 KB. Every token's matrix is independent, so here a thread
// takes blocks of 16 tokens and runs all iterations on them in L1, the 16 tokens in the lanes of
// one vector: one fork and join per call.
//
// Sums run in index order and every step is the reference's formula (x / (sum + eps)), so results
// match torch's to a few fp32 ulps (the order of torch's vectorized sums differs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace {

constexpr int64_t kMaxStreams = 16, kLanes = 16;

at::Tensor sinkhorn(const at::Tensor& logits, int64_t iters, double eps) {
  TORCH_CHECK(logits.dim() >= 2 && logits.size(-1) == logits.size(-2) && logits.size(-1) <= kMaxStreams,
              "sparseek_cpu::sinkhorn: logits [..., S, S] with S <= 16 expected, got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "sparseek_cpu::sinkhorn: fp32 logits expected");
  TORCH_CHECK(iters >= 1, "sparseek_cpu::sinkhorn: iters >= 1 expected");
  const at::Tensor x = logits.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t S = x.size(-1), SS = S * S, N = S ? x.numel() / SS : 0;
  const float e = static_cast<float>(eps);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  // 16 tokens at a time, entry-major (m[entry][token]): every step below is one loop over the 16
  // tokens, which the compiler turns into one vector instruction
  at::parallel_for(0, (N + kLanes - 1) / kLanes, 4, [&](int64_t begin, int64_t end) {
    float m[kMaxStreams * kMaxStreams][kLanes], sum[kMaxStreams][kLanes];
    for (int64_t blk = begin; blk < end; blk++) {
      const int64_t n0 = blk * kLanes, lanes = std::min(kLanes, N - n0);
      for (int64_t t = 0; t < kLanes; t++)  // a partial block repeats its last token
        for (int64_t q = 0; q < SS; q++) m[q][t] = src[(n0 + std::min(t, lanes - 1)) * SS + q];
      for (int64_t i = 0; i < S; i++) {  // row softmax, plus eps
        float* row[kMaxStreams];
        for (int64_t j = 0; j < S; j++) row[j] = m[i * S + j];
        for (int64_t t = 0; t < kLanes; t++) {
          float mx = row[0][t];
          for (int64_t j = 1; j < S; j++) mx = std::max(mx, row[j][t]);
          float s = 0.f;
          for (int64_t j = 0; j < S; j++) s += (row[j][t] = std::exp(row[j][t] - mx));
          for (int64_t j = 0; j < S; j++) row[j][t] = row[j][t] / s + e;
        }
      }
      for (int64_t it = 0; it < iters; it++) {
        if (it > 0) {  // rows
          for (int64_t i = 0; i < S; i++) {
            float s[kLanes] = {};
            for (int64_t j = 0; j < S; j++)
              for (int64_t t = 0; t < kLanes; t++) s[t] += m[i * S + j][t];
            for (int64_t j = 0; j < S; j++)
              for (int64_t t = 0; t < kLanes; t++) m[i * S + j][t] = m[i * S + j][t] / (s[t] + e);
          }
        }
        for (int64_t j = 0; j < S; j++)  // columns
          for (int64_t t = 0; t < kLanes; t++) sum[j][t] = 0.f;
        for (int64_t i = 0; i < S; i++)
          for (int64_t j = 0; j < S; j++)
            for (int64_t t = 0; t < kLanes; t++) sum[j][t] += m[i * S + j][t];
        for (int64_t i = 0; i < S; i++)
          for (int64_t j = 0; j < S; j++)
            for (int64_t t = 0; t < kLanes; t++) m[i * S + j][t] = m[i * S + j][t] / (sum[j][t] + e);
      }
      for (int64_t t = 0; t < lanes; t++)
        for (int64_t q = 0; q < SS; q++) dst[(n0 + t) * SS + q] = m[q][t];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparseek_cpu, m) {
  m.def("sinkhorn(Tensor logits, int iters, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparseek_cpu, CPU, m) {
  m.impl("sinkhorn", &sinkhorn);
}
