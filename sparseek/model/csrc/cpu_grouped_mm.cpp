// Grouped bf16 GEMM for the routed experts on CPUs with AMX (Intel Sapphire Rapids and later).
//
// y[r, :] = x[r, :] @ w[e]^T for the rows r of group e (offs: each group's cumulative row end),
// the product torch._grouped_mm computes. Why by hand: on the CPU torch runs that as one oneDNN
// GEMM per expert, and each call re-packs its weight matrix for the tile unit (~25-35 us) whatever
// its rows; a prompt of 128 tokens gives an expert ~16 rows, so packing is most of the time.
// Here the weights are never packed: a tile of 16 weight rows (w's own [N, K] layout, K
// contiguous) is AMX's left operand as it lies in memory; the right operand is x, whose rows are
// few and are packed once per call (pairs of k interleaved, 16 rows to a block). The tile unit
// then computes y^T blocks [16 n x 16 rows] in fp32, which are transposed in registers and rounded
// to bf16 once, so results match a GEMM with fp32 accumulation.
//
// Built at first use by torch.utils.cpp_extension (sparseek/model/cpu_kernels.py), only on CPUs
// whose flags list amx_bf16 and avx512_bf16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#ifndef SPARSEEK_GMM_PREFETCH  // benchmarks/cpu_kernel_ab.py builds the kernel with 0 to time what it gains
#define SPARSEEK_GMM_PREFETCH 1
#endif

namespace {

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void configure_tiles() {
  // 8 tiles of 16 rows x 64 bytes: 0-1 weights, 2-3 packed x, 4-7 the fp32 accumulators
  TileConfig c{};
  c.palette = 1;
  for (int t = 0; t < 8; t++) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  _tile_loadconfig(&c);
}

bool amx_permitted() {
  // Linux hands a process the tile registers' state only on request (ARCH_REQ_XCOMP_PERM = 0x1023,
  // XFEATURE_XTILEDATA = 18); oneDNN asks too, asking twice is harmless.
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

// Transpose 16 x 16 32-bit lanes in registers.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int h = 0; h < 2; h++)
    for (int j = 0; j < 4; j++) {
      t[8 * h + j] = _mm512_shuffle_i32x4(r[8 * h + j], r[8 * h + j + 4], 0x88);
      t[8 * h + j + 4] = _mm512_shuffle_i32x4(r[8 * h + j], r[8 * h + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; j++) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// Rows [first, first + rows) of x (bf16 pairs read as uint32, row stride ld32) into one block
// [K/2][16] of uint32: entry (kk, i) holds row i's (x[2kk], x[2kk + 1]), rows past `rows` zero.
void pack_block(const uint32_t* x32, int64_t ld32, int64_t first, int64_t rows, int64_t K2, uint32_t* dst) {
  __m512i r[16];
  for (int64_t kk = 0; kk < K2; kk += 16) {
    for (int i = 0; i < 16; i++)
      r[i] = i < rows ? _mm512_loadu_si512(x32 + (first + i) * ld32 + kk) : _mm512_setzero_si512();
    transpose16(r);
    for (int j = 0; j < 16; j++) _mm512_storeu_si512(dst + (kk + j) * 16, r[j]);
  }
}

// An fp32 tile [16 n][16 rows] into y[row][n .. n + 16) as bf16, rows < `rows`.
void store_transposed(const float* c, at::BFloat16* y, int64_t ldy, int64_t rows) {
  __m512i r[16];
  for (int i = 0; i < 16; i++) r[i] = _mm512_load_si512(c + 16 * i);
  transpose16(r);
  for (int64_t m = 0; m < rows; m++)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * ldy),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(r[m])));
}

// The product for groups ending at rows o[0 .. E) (w [E, N, K]); both ops below check their operands.
at::Tensor grouped_product(const at::Tensor& x, const at::Tensor& w, const int64_t* o) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 x and w expected");
  const int64_t M = x.size(0), K = x.size(1), E = w.size(0), N = w.size(1), K2 = K / 2;
  TORCH_CHECK(w.size(2) == K && K % 32 == 0 && N % 32 == 0, "K and N must be multiples of 32");
  TORCH_CHECK(x.stride(1) == 1 && w.stride(2) == 1 && x.stride(0) % 2 == 0 && w.stride(1) % 2 == 0,
              "x's and w's last dimension must be contiguous");
  TORCH_CHECK(amx_permitted(), "the kernel did not get the AMX tile state from the OS");
  at::Tensor y = at::empty({M, N}, x.options());

  // Row blocks of 16 rows of one group; `first_block[e]` .. `first_block[e + 1]` are group e's.
  std::vector<int64_t> row0, nrows, first_block(E + 1);
  for (int64_t e = 0, s = 0; e < E; s = o[e], e++) {
    TORCH_CHECK(o[e] >= s && o[e] <= M, "offs must be non-decreasing and at most x.size(0)");
    first_block[e] = row0.size();
    for (int64_t r = s; r < o[e]; r += 16) {
      row0.push_back(r);
      nrows.push_back(std::min<int64_t>(16, o[e] - r));
    }
  }
  first_block[E] = row0.size();
  const int64_t B = row0.size();
  if (B == 0) return y;
  at::Tensor packed = at::empty({B, K2, 16}, x.options().dtype(at::kInt));
  auto* xp = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  const auto* x32 = reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>());
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) pack_block(x32, x.stride(0) / 2, row0[b], nrows[b], K2, xp + b * K2 * 16);
  });

  // Tasks: (group, 64 columns), the costliest first, taken by the threads from a shared counter
  // (routing gives groups very different row counts, so static halves would idle a thread).
  constexpr int64_t NB = 64;
  struct Task { int64_t e, n, cost; };
  std::vector<Task> tasks;
  for (int64_t e = 0; e < E; e++)
    if (first_block[e + 1] > first_block[e])
      for (int64_t n = 0; n < N; n += NB) tasks.push_back({e, n, first_block[e + 1] - first_block[e]});
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const auto* wp = w.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  const int64_t lde = w.stride(0), ldw = w.stride(1), ntasks = tasks.size();
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), ntasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    configure_tiles();
    alignas(64) float c[4][256];
    // A thread claims its next task before it runs this one, so that the weights it reads next
    // are fetched into L2 while it computes: a line of each of the next 32 weight rows per k step
    // (the tile loads alone leave the weight stream waiting on memory; benchmarks/cpu_kernel_ab.py,
    // benchmarks/results/cpu-grouped-mm-prefetch.txt).
    int64_t t = next.fetch_add(1);
    while (t < ntasks) {
      const int64_t t_next = next.fetch_add(1);
      const int64_t e = tasks[t].e, n_end = std::min(tasks[t].n + NB, N);
      for (int64_t n = tasks[t].n; n < n_end; n += 32) {
        const at::BFloat16* wn = wp + e * lde + n * ldw;
        const at::BFloat16* ahead = n + 32 < n_end ? wn + 32 * ldw
                                    : t_next < ntasks ? wp + tasks[t_next].e * lde + tasks[t_next].n * ldw : nullptr;
        for (int64_t b = first_block[e]; b < first_block[e + 1]; b += 2) {
          const bool two = b + 1 < first_block[e + 1];
          const at::BFloat16* pf = SPARSEEK_GMM_PREFETCH && b == first_block[e] ? ahead : nullptr;
          const uint32_t* xb = xp + b * K2 * 16;
          _tile_zero(4);
          _tile_zero(5);
          _tile_zero(6);
          _tile_zero(7);
          for (int64_t k = 0; k < K; k += 32) {
            if (pf != nullptr)
              for (int r = 0; r < 32; r++) _mm_prefetch(reinterpret_cast<const char*>(pf + r * ldw + k), _MM_HINT_T1);
            _tile_loadd(0, wn + k, ldw * 2);
            _tile_loadd(1, wn + 16 * ldw + k, ldw * 2);
            _tile_loadd(2, xb + k / 2 * 16, 64);
            _tile_dpbf16ps(4, 0, 2);
            _tile_dpbf16ps(5, 1, 2);
            if (two) {
              _tile_loadd(3, xb + K2 * 16 + k / 2 * 16, 64);
              _tile_dpbf16ps(6, 0, 3);
              _tile_dpbf16ps(7, 1, 3);
            }
          }
          _tile_stored(4, c[0], 64);
          _tile_stored(5, c[1], 64);
          store_transposed(c[0], yp + row0[b] * N + n, N, nrows[b]);
          store_transposed(c[1], yp + row0[b] * N + n + 16, N, nrows[b]);
          if (two) {
            _tile_stored(6, c[2], 64);
            _tile_stored(7, c[3], 64);
            store_transposed(c[2], yp + row0[b + 1] * N + n, N, nrows[b + 1]);
            store_transposed(c[3], yp + row0[b + 1] * N + n + 16, N, nrows[b + 1]);
          }
        }
      }
      t = t_next;
    }
    _tile_release();
  });
  return y;
}

at::Tensor grouped_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offs) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && offs.dim() == 1 && offs.size(0) == w.size(0),
              "sparseek_cpu::grouped_mm: x [M, K], w [E, N, K] and offs [E] expected");
  const at::Tensor ends = offs.to(at::kLong).contiguous();
  return grouped_product(x, w, ends.data_ptr<int64_t>());
}

// y = x @ w^T for one weight w [N, K]: a dense layer's product, a group of all of x's rows.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "sparseek_cpu::linear: x [M, K] and w [N, K] expected");
  const int64_t end = x.size(0);
  return grouped_product(x, w.unsqueeze(0), &end);
}

// How many threads a parallel region of this library runs on: at::parallel_for is compiled into
// the library from ATen's headers, and without OpenMP it quietly runs on the calling thread alone.
int64_t parallel_threads() {
  std::atomic<int64_t> seen{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { seen++; });
  return seen.load();
}

}  // namespace

TORCH_LIBRARY(sparseek_cpu, m) {
  m.def("grouped_mm(Tensor x, Tensor w, Tensor offs) -> Tensor");
  m.def("linear(Tensor x, Tensor w) -> Tensor");
  m.def("parallel_threads() -> int", &parallel_threads);
}

TORCH_LIBRARY_IMPL(sparseek_cpu, CPU, m) {
  m.impl("grouped_mm", &grouped_mm);
  m.impl("linear", &linear);
}
