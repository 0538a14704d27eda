// The sparse attention's softmax on the CPU: [window keys ; compressed keys ; sink] per query and
// head, from the bf16 score products to bf16 probabilities and the fp32 log-denominator.
//
// v4.attend_lse is the reference: scores s = float(q . k) * scale, masked keys at -inf, m = the
// row's max (the sink's logit included), p = exp(s - m) / (sum exp(s - m) + exp(sink - m)),
// lse = m + log(denominator). Why by hand: inductor emits it as ~6 passes over the [rows, keys]
// scores in 3 parallel loops, each key vector read with its bool mask converted lane by lane and
// tails of masked vector ops (191 window keys per query at a 256-token prompt): ~0.6-0.9 ms per
// layer of `small`. Here a thread takes whole rows, keeps a row's scaled scores in L1 and makes
// three passes over them (max, exp and sum, divide and round).
//
// exp is Cephes' single-precision polynomial (within ~1 ulp, as torch's Sleef exp), so
// probabilities match torch's to an ulp of fp32 before their rounding to bf16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "bf16_vec.h"

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

inline __m512 exp512(__m512 x) {
  // exp(x) = 2^n exp(r), n = round(x log2 e), r = x - n ln 2 in two parts; below -104 the result
  // is 0 in fp32 (callers zero masked lanes themselves)
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail(int64_t left) { return left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1); }

// One part of a row (window or compressed keys): its scaled, masked scores into buf, the max
inline float load_part(const at::BFloat16* s, const bool* keep, int64_t n, float scale, float* buf) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 ninf = mx, sc = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail(n - j);
    const __m512 v = _mm512_mul_ps(sparseek_vec::load_bf16(s + j, t), sc);
    const __mmask16 k = _mm_test_epi8_mask(_mm_maskz_loadu_epi8(t, keep + j), _mm_set1_epi8(1)) & t;
    const __m512 w = _mm512_mask_mov_ps(ninf, k, v);
    _mm512_mask_storeu_ps(buf + j, t, w);
    mx = _mm512_max_ps(mx, w);
  }
  return _mm512_reduce_max_ps(mx);
}

// exp(buf - m) in place (-inf entries to exactly 0), their sum
inline float exp_part(float* buf, int64_t n, float m) {
  __m512 sum = _mm512_setzero_ps();
  const __m512 mv = _mm512_set1_ps(m), ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail(n - j);
    const __m512 v = _mm512_maskz_loadu_ps(t, buf + j);
    const __mmask16 live = _mm512_cmp_ps_mask(v, ninf, _CMP_NEQ_OQ) & t;
    const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(v, mv)));
    _mm512_mask_storeu_ps(buf + j, t, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// buf / denom rounded to bf16 (to nearest even, as c10::BFloat16) into p
inline void divide_part(const float* buf, int64_t n, float denom, at::BFloat16* p) {
  const __m512 d = _mm512_set1_ps(denom);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail(n - j);
    sparseek_vec::store_bf16(p + j, _mm512_div_ps(_mm512_maskz_loadu_ps(t, buf + j), d), t);
  }
}

// (p_win [R, H, L] bf16, p_comp [R, H, N] bf16, lse [R, H] fp32) from the score products s_win
// [R, H, L] / s_comp [R, H, N] (bf16), the keys each query row may see (keep_win [R, L],
// keep_comp [R, N]: bool, shared by the H heads), the sink logits [H] and the scale.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_softmax(const at::Tensor& s_win, const at::Tensor& keep_win,
                                                             const c10::optional<at::Tensor>& s_comp_opt,
                                                             const c10::optional<at::Tensor>& keep_comp_opt,
                                                             const at::Tensor& sink, double scale) {
  const char* op = "sparseek_cpu::attn_softmax: ";
  TORCH_CHECK(s_win.scalar_type() == at::kBFloat16 && s_win.dim() == 3 && s_win.is_contiguous(), op,
              "contiguous bf16 window scores [R, H, L] expected, got ", s_win.scalar_type(), " ", s_win.sizes());
  const int64_t R = s_win.size(0), H = s_win.size(1), L = s_win.size(2);
  TORCH_CHECK(keep_win.scalar_type() == at::kBool && keep_win.is_contiguous() && keep_win.sizes() == at::IntArrayRef({R, L}),
              op, "a contiguous bool window mask [R, L] = [", R, ", ", L, "] expected, got ", keep_win.sizes());
  TORCH_CHECK(sink.scalar_type() == at::kFloat && sink.is_contiguous() && sink.sizes() == at::IntArrayRef({H}), op,
              "fp32 sink logits [H] = [", H, "] expected, got ", sink.scalar_type(), " ", sink.sizes());
  TORCH_CHECK(s_comp_opt.has_value() == keep_comp_opt.has_value(), op, "compressed scores and their mask go together");
  int64_t N = 0;
  at::Tensor s_comp, keep_comp;
  if (s_comp_opt.has_value()) {
    s_comp = *s_comp_opt;
    keep_comp = *keep_comp_opt;
    TORCH_CHECK(s_comp.scalar_type() == at::kBFloat16 && s_comp.dim() == 3 && s_comp.is_contiguous() &&
                    s_comp.size(0) == R && s_comp.size(1) == H, op,
                "contiguous bf16 compressed scores [R, H, N] expected, got ", s_comp.scalar_type(), " ", s_comp.sizes());
    N = s_comp.size(2);
    TORCH_CHECK(keep_comp.scalar_type() == at::kBool && keep_comp.is_contiguous() &&
                    keep_comp.sizes() == at::IntArrayRef({R, N}), op,
                "a contiguous bool compressed-key mask [R, N] expected, got ", keep_comp.sizes());
  }
  at::Tensor p_win = at::empty_like(s_win);
  at::Tensor p_comp = s_comp.defined() ? at::empty_like(s_comp) : at::empty({R, H, 0}, s_win.options());
  at::Tensor lse = at::empty({R, H}, s_win.options().dtype(at::kFloat));
  const auto *sw = s_win.data_ptr<at::BFloat16>(), *scp = N ? s_comp.data_ptr<at::BFloat16>() : nullptr;
  const bool *kw = keep_win.data_ptr<bool>(), *kc = N ? keep_comp.data_ptr<bool>() : nullptr;
  const float* sk = sink.data_ptr<float>();
  auto *pw = p_win.data_ptr<at::BFloat16>(), *pc = N ? p_comp.data_ptr<at::BFloat16>() : nullptr;
  float* lp = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, R * H, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> bw(L + 16), bc(N + 16);
    for (int64_t rh = begin; rh < end; rh++) {
      const int64_t r = rh / H, h = rh % H;
      float m = std::max(load_part(sw + rh * L, kw + r * L, L, sc, bw.data()), sk[h]);
      if (N) m = std::max(m, load_part(scp + rh * N, kc + r * N, N, sc, bc.data()));
      float denom = exp_part(bw.data(), L, m) + std::exp(sk[h] - m);
      if (N) denom += exp_part(bc.data(), N, m);
      divide_part(bw.data(), L, denom, pw + rh * L);
      if (N) divide_part(bc.data(), N, denom, pc + rh * N);
      lp[rh] = m + std::log(denom);
    }
  });
  return {p_win, p_comp, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparseek_cpu, m) {
  m.def("attn_softmax(Tensor s_win, Tensor keep_win, Tensor? s_comp, Tensor? keep_comp, Tensor sink, float scale) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparseek_cpu, CPU, m) {
  m.impl("attn_softmax", &attn_softmax);
}
