// bf16 <-> fp32 for 16 lanes, shared by the CPU ops (cpu_mhc.cpp, cpu_attention.cpp).
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

namespace sparseek_vec {

// the lanes set in `lanes` (others 0) of 16 bf16 values at p, widened exactly to fp32
inline __m512 load_bf16(const at::BFloat16* p, __mmask16 lanes = 0xffff) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, p)), 16));
}

// fp32 -> bf16 rounding to nearest even, NaN to 0x7fc0: c10::BFloat16's conversion, 16 at a time
inline __m256i round_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

inline void store_bf16(at::BFloat16* p, __m512 v, __mmask16 lanes = 0xffff) {
  _mm256_mask_storeu_epi16(p, lanes, round_bf16(v));
}

}  // namespace sparseek_vec
