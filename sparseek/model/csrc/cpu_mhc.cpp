// mHC on the CPU: the Sinkhorn projection (one doubly-stochastic S x S matrix per token), and
// whole mHC passes over bf16 streams (mhc_pre, mhc_post below).
//
// sinkhorn: comb = softmax(logits, rows) + eps, then columns and rows normalized in turn
// (v4.sinkhorn is the reference). Why by hand: each normalization is a reduction over 4 entries,
// and inductor emits one parallel loop per reduction, ~40 per call, each ending in a thread
// barrier, for a 128-token prompt whose matrices hold 8 KB. Every token's matrix is independent,
// so here a thread takes blocks of 16 tokens and runs all iterations on them in L1, the 16 tokens
// in the lanes of one vector: one fork and join per call.
//
// Sums run in index order and every step is the reference's formula (x / (sum + eps)), so results
// match torch's to a few fp32 ulps (the order of torch's vectorized sums differs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "bf16_vec.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

using sparseek_vec::load_bf16;
using sparseek_vec::store_bf16;

constexpr int64_t kMaxStreams = 16, kLanes = 16;

// The Sinkhorn steps on 16 tokens' S x S matrices held entry-major (m[entry][token]), in place:
// every step is one loop over the 16 tokens, which the compiler turns into one vector instruction.
void sinkhorn_lanes(float (*m)[kLanes], int64_t S, int64_t iters, float e) {
  float sum[kMaxStreams][kLanes];
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
}

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
  at::parallel_for(0, (N + kLanes - 1) / kLanes, 4, [&](int64_t begin, int64_t end) {
    float m[kMaxStreams * kMaxStreams][kLanes];
    for (int64_t blk = begin; blk < end; blk++) {
      const int64_t n0 = blk * kLanes, lanes = std::min(kLanes, N - n0);
      for (int64_t t = 0; t < kLanes; t++)  // a partial block repeats its last token
        for (int64_t q = 0; q < SS; q++) m[q][t] = src[(n0 + std::min(t, lanes - 1)) * SS + q];
      sinkhorn_lanes(m, S, iters, e);
      for (int64_t t = 0; t < lanes; t++)
        for (int64_t q = 0; q < SS; q++) dst[(n0 + t) * SS + q] = m[q][t];
    }
  });
  return out;
}

// ---------------------------------------------------------------- whole mHC passes (bf16 streams)
//
// v4.hc_pre + the sublayer's RMSNorm, and v4.hc_post, for bf16 streams [N, S, D]. Why by hand: a
// site's work per token is one read of its S x D streams (4 KB for `small`), but as torch ops it
// is a bf16 -> fp32 copy of the whole [N, S, D], a library GEMM [N, S*D] x [S*D, (2+S)*S] (N = 24
// output columns: ~100 GFLOP/s on two cores), and three more kernels, each a pass with its own
// fork and join: a 256-token `small` prefill spent 15.6 ms in mHC compiled, 6.5 with these ops
// (benchmarks/profile_decode.py --prefill 256 --hot-paths --breakdown). Here a thread takes 16
// tokens, converts their streams once into L1/L2, and runs the mixing products, the Sinkhorn, the
// merge and the norm on them.
//
// Rounding follows the eager code: fp32 products and sums (in another order: results match to a
// few fp32 ulps), the merged input rounded to bf16 before the norm, the norm's output rounded once.
// The C++ here is built with -ffp-contract=off, so a product and a sum round as torch's do.

inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

void check_streams(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() >= 2 && x.is_contiguous(), "sparseek_cpu::", op,
              ": contiguous bf16 streams [..., S, D] expected, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.size(-2) >= 1 && x.size(-2) <= kMaxStreams && x.size(-1) % 16 == 0, "sparseek_cpu::", op,
              ": S <= 16 streams of D % 16 == 0 values expected, got ", x.sizes());
}

void check_fp32(const at::Tensor& t, at::IntArrayRef shape, const char* what, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape, "sparseek_cpu::", op,
              ": contiguous fp32 ", what, " of shape ", shape, " expected, got ", t.scalar_type(), " ", t.sizes());
}

// (h, post, comb) = the sublayer's normalized input attn_norm(h) (bf16 [..., D]), and mHC's post
// [..., S] and comb [..., S, S] (fp32) for the streams x [..., S, D]; fn [(2+S)S, S*D], scale [3],
// base [(2+S)S] are the site's mixing parameters, norm_w [D] the sublayer norm's weight.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mhc_pre(const at::Tensor& x, const at::Tensor& fn,
                                                       const at::Tensor& scale, const at::Tensor& base,
                                                       const at::Tensor& norm_w, int64_t iters, double norm_eps,
                                                       double hc_eps, double rms_eps) {
  check_streams(x, "mhc_pre");
  const int64_t S = x.size(-2), D = x.size(-1), K = S * D, M = (2 + S) * S, N = x.numel() / K;
  check_fp32(fn, {M, K}, "fn", "mhc_pre");
  check_fp32(scale, {3}, "scale", "mhc_pre");
  check_fp32(base, {M}, "base", "mhc_pre");
  check_fp32(norm_w, {D}, "norm weight", "mhc_pre");
  TORCH_CHECK(iters >= 1, "sparseek_cpu::mhc_pre: iters >= 1 expected");
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 2);
  auto shape = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> s = lead;
    s.insert(s.end(), tail);
    return s;
  };
  at::Tensor h = at::empty(shape({D}), x.options());
  at::Tensor post = at::empty(shape({S}), x.options().dtype(at::kFloat));
  at::Tensor comb = at::empty(shape({S, S}), x.options().dtype(at::kFloat));
  const auto* xp = x.data_ptr<at::BFloat16>();
  const float *fp = fn.data_ptr<float>(), *sc = scale.data_ptr<float>(), *bp = base.data_ptr<float>(),
              *wp = norm_w.data_ptr<float>();
  auto* hp = h.data_ptr<at::BFloat16>();
  float *postp = post.data_ptr<float>(), *combp = comb.data_ptr<float>();
  const float ne = static_cast<float>(norm_eps), he = static_cast<float>(hc_eps), re = static_cast<float>(rms_eps);

  at::parallel_for(0, (N + kLanes - 1) / kLanes, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xf_buf(kLanes * K), mix_buf(kLanes * M), hf(D);
    float* xf = xf_buf.data();
    float* mix = mix_buf.data();
    float rs[kLanes], pre[kLanes][kMaxStreams], m[kMaxStreams * kMaxStreams][kLanes];
    for (int64_t blk = begin; blk < end; blk++) {
      const int64_t n0 = blk * kLanes, lanes = std::min(kLanes, N - n0);
      for (int64_t t = 0; t < lanes; t++) {  // the streams in fp32, and 1 / RMS over all S*D values
        __m512 ss = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
          const __m512 v = load_bf16(xp + (n0 + t) * K + k);
          _mm512_storeu_ps(xf + t * K + k, v);
          ss = _mm512_add_ps(ss, _mm512_mul_ps(v, v));
        }
        rs[t] = 1.f / std::sqrt(_mm512_reduce_add_ps(ss) / K + ne);
      }
      // mixing logits fn @ x: 4 tokens x 4 rows of fn per pass over K (16 accumulators), so each
      // load feeds 4 FMAs; a partial group repeats its last token / row and drops the result
      for (int64_t t0 = 0; t0 < lanes; t0 += 4)
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
          const float *xr[4], *wr[4];
          for (int i = 0; i < 4; i++) {
            xr[i] = xf + std::min<int64_t>(t0 + i, lanes - 1) * K;
            wr[i] = fp + std::min<int64_t>(m0 + i, M - 1) * K;
          }
          __m512 acc[4][4];
          for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
          for (int64_t k = 0; k < K; k += 16) {
            __m512 w[4];
            for (int j = 0; j < 4; j++) w[j] = _mm512_loadu_ps(wr[j] + k);
            for (int i = 0; i < 4; i++) {
              const __m512 v = _mm512_loadu_ps(xr[i] + k);
              for (int j = 0; j < 4; j++) acc[i][j] = _mm512_fmadd_ps(v, w[j], acc[i][j]);
            }
          }
          for (int i = 0; i < 4 && t0 + i < lanes; i++)
            for (int j = 0; j < 4 && m0 + j < M; j++) mix[(t0 + i) * M + m0 + j] = _mm512_reduce_add_ps(acc[i][j]);
        }
      for (int64_t t = 0; t < kLanes; t++) {  // pre, post, and comb's logits (a partial block repeats its last token)
        const int64_t tt = std::min(t, lanes - 1);
        const float* mx = mix + tt * M;
        for (int64_t s = 0; s < S; s++) {
          pre[t][s] = sigmoid(mx[s] * rs[tt] * sc[0] + bp[s]) + he;
          if (t < lanes) postp[(n0 + t) * S + s] = 2.f * sigmoid(mx[S + s] * rs[tt] * sc[1] + bp[S + s]);
        }
        for (int64_t q = 0; q < S * S; q++) m[q][t] = mx[2 * S + q] * rs[tt] * sc[2] + bp[2 * S + q];
      }
      sinkhorn_lanes(m, S, iters, he);
      for (int64_t t = 0; t < lanes; t++) {
        for (int64_t q = 0; q < S * S; q++) combp[(n0 + t) * S * S + q] = m[q][t];
        // h = sum_s pre_s x_s, rounded to the streams' bf16, then the sublayer's RMSNorm
        __m512 ss = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
          __m512 acc = _mm512_mul_ps(_mm512_set1_ps(pre[t][0]), _mm512_loadu_ps(xf + t * K + d));
          for (int64_t s = 1; s < S; s++)
            acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(pre[t][s]), _mm512_loadu_ps(xf + t * K + s * D + d)));
          store_bf16(hp + (n0 + t) * D + d, acc);
          const __m512 r = load_bf16(hp + (n0 + t) * D + d);
          _mm512_storeu_ps(hf.data() + d, r);
          ss = _mm512_add_ps(ss, _mm512_mul_ps(r, r));
        }
        const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / D + re));
        for (int64_t d = 0; d < D; d += 16)
          store_bf16(hp + (n0 + t) * D + d,
                     _mm512_mul_ps(_mm512_loadu_ps(wp + d), _mm512_mul_ps(_mm512_loadu_ps(hf.data() + d), inv)));
      }
    }
  });
  return {h, post, comb};
}

// v4.hc_post for bf16 streams: out_k = sum_j comb[j, k] x_j + post_k f, rounded to bf16 once.
at::Tensor mhc_post(const at::Tensor& f, const at::Tensor& x, const at::Tensor& post, const at::Tensor& comb) {
  check_streams(x, "mhc_post");
  const int64_t S = x.size(-2), D = x.size(-1), N = x.numel() / (S * D);
  TORCH_CHECK(f.scalar_type() == at::kBFloat16 && f.is_contiguous() && f.numel() == N * D && f.size(-1) == D,
              "sparseek_cpu::mhc_post: a contiguous bf16 sublayer output [..., D] for the streams expected, got ",
              f.scalar_type(), " ", f.sizes());
  check_fp32(post, {N, S}, "post (as [N, S])", "mhc_post");
  check_fp32(comb, {N, S, S}, "comb (as [N, S, S])", "mhc_post");
  at::Tensor out = at::empty_like(x);
  const auto *xp = x.data_ptr<at::BFloat16>(), *fp = f.data_ptr<at::BFloat16>();
  const float *pp = post.data_ptr<float>(), *cp = comb.data_ptr<float>();
  auto* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++) {
      const at::BFloat16* xn = xp + n * S * D;
      const float* c = cp + n * S * S;
      for (int64_t d = 0; d < D; d += 16) {
        __m512 xs[kMaxStreams];
        for (int64_t j = 0; j < S; j++) xs[j] = load_bf16(xn + j * D + d);
        const __m512 fv = load_bf16(fp + n * D + d);
        for (int64_t k = 0; k < S; k++) {
          __m512 acc = _mm512_mul_ps(_mm512_set1_ps(c[k]), xs[0]);
          for (int64_t j = 1; j < S; j++) acc = _mm512_fmadd_ps(_mm512_set1_ps(c[j * S + k]), xs[j], acc);
          store_bf16(op + (n * S + k) * D + d, _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(pp[n * S + k]), fv)));
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparseek_cpu, m) {
  m.def("sinkhorn(Tensor logits, int iters, float eps) -> Tensor");
  m.def("mhc_pre(Tensor x, Tensor fn, Tensor scale, Tensor base, Tensor norm_w, int iters, float norm_eps, "
        "float hc_eps, float rms_eps) -> (Tensor, Tensor, Tensor)");
  m.def("mhc_post(Tensor f, Tensor x, Tensor post, Tensor comb) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparseek_cpu, CPU, m) {
  m.impl("sinkhorn", &sinkhorn);
  m.impl("mhc_pre", &mhc_pre);
  m.impl("mhc_post", &mhc_post);
}
