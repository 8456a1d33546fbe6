// Fused unpack-dequantize-matmul for GPTQ-packed weights on the CPU (2/3/4/8 bits).
//
//   y[m, n] = sum_g  s[g, n] * (sum_{k in g} x[m, k] q[k, n])  -  z[g, n] s[g, n] * (sum_{k in g} x[m, k])
//
// The integer weights are decoded from the packed words in registers and never written out as a
// dense matrix: the kernel reads bits/32 of the bytes a float32 matmul reads (plus 3 bytes per
// group and column for the fp16 scale and the uint8 zero point). Per group of `group` input
// columns, sum_k x_k q_k is accumulated in float32 registers and the scale/zero point are applied
// once. Groups must be contiguous runs of `group` input columns (act_order checkpoints are
// permuted once at load time, see vlmq/qlinear.py).
//
// Kernel layout (made once at load time by vlmq.qlinear from the on-disk GPTQ tensors, which stay
// as they are): the output columns are cut into blocks of NB = 64; block b holds
//   qw [nblocks, K * BITS / 32, NB] int32   the GPTQ words of its 64 columns, all K (contiguous,
//                                           so one thread streams one block front to back)
//   s  [nblocks, G, NB] float16             scales
//   z  [nblocks, G, NB] uint8               zero points
// N is padded up to a multiple of NB with zero words/scales. Within a column, the words are the
// GPTQ bit stream along K: value k at bits [BITS k, BITS k + BITS) (3 bits: 32 values in 3 words,
// values 10 and 21 straddle two words).
//
// Instruction sets: one build holds an AVX-512F, an AVX2+FMA+F16C and a portable copy of the
// kernel (gptq_cpu_body.h, compiled under `#pragma GCC target`), the best one the CPU supports is
// chosen at run time; the build itself needs no -march flag, so it is correct on any x86-64 (and
// the portable copy alone elsewhere). Decoding a 2/3/4-bit value is a shift and a permute with a
// 16-entry table (vpermps ignores the index bits above the low 4/3), 8 bits a shift, mask and
// convert. Threads: at::parallel_for over column blocks (torch.set_num_threads applies).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define VLMQ_X86 1
#endif

namespace {

constexpr int NB = 64;  // output columns per block of the kernel layout

struct Job {
  const float* x;       // [M, K]
  const float* xsum;    // [M, G]: sum of x over each group
  int64_t M, K, G, group, N;
  const uint32_t* qw;   // [nblocks, K * BITS / 32, NB]
  const uint16_t* s;    // [nblocks, G, NB] float16 bits
  const uint8_t* z;     // [nblocks, G, NB]
  float* y;             // [M, N]
};
using BlockFn = void (*)(const Job&, int64_t, int64_t);
using DequantFn = void (*)(const Job&, int64_t, int64_t, int64_t, float*, int64_t);  // block, k0, k1, out, ld
using SplitFn = void (*)(const float*, int64_t, uint16_t*, uint16_t*);                 // values, n, hi, lo
struct Kernels {  // one ISA's kernel functions for one bit width (gptq_cpu_body.h `kernels`)
  BlockFn block;
  DequantFn dequant;
  SplitFn split;
};

// ---- portable: GCC/Clang vector extensions (SSE2 on a baseline x86-64, NEON on arm64, ...) ----
namespace generic {
struct V {
  // 128-bit vectors (SSE2 / NEON registers: 16 of them)
  static constexpr int W = 4, VT1 = 2, VT2 = 2, VT4 = 1;
  static constexpr bool PRESHIFT = false;
  typedef float vf __attribute__((vector_size(16)));
  typedef uint32_t vu __attribute__((vector_size(16)));
  typedef int32_t vi __attribute__((vector_size(16)));
  typedef int lut_t;
  static inline vu load(const uint32_t* p) { vu v; std::memcpy(&v, p, sizeof(v)); return v; }
  static inline vf zero() { return vf{}; }
  static inline vf set1(float a) { return vf{} + a; }
  static inline vu srl(vu v, int s) { return v >> s; }
  static inline vu sll(vu v, int s) { return v << s; }
  static inline vu or_(vu a, vu b) { return a | b; }
  template <int B> static inline lut_t lut() { return 0; }
  template <int B> static inline vf lookup(vu v, lut_t) {
    return __builtin_convertvector((vi)(v & ((1u << B) - 1u)), vf);
  }
  template <int B> static inline vf decode(vu v, int sh, lut_t l) { return lookup<B>(sh ? v >> sh : v, l); }
  template <int B> static inline vf masked(vu v, int sh) { return __builtin_convertvector((vi)(v & (((1u << B) - 1u) << sh)), vf); }
  static inline vf fma(vf a, vf b, vf c) { return a * b + c; }
  static inline vf fnma(vf a, vf b, vf c) { return c - a * b; }
  static inline vf mul(vf a, vf b) { return a * b; }
  static inline vf add(vf a, vf b) { return a + b; }
  static inline vf load_h(const uint16_t* p) {
    vf v;
    for (int i = 0; i < W; ++i) v[i] = static_cast<float>(c10::Half(p[i], c10::Half::from_bits()));
    return v;
  }
  static inline vf load_b(const uint8_t* p) {
    vf v;
    for (int i = 0; i < W; ++i) v[i] = (float)p[i];
    return v;
  }
  static inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
  static inline vf loadf(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
};
#include "gptq_cpu_body.h"
}  // namespace generic

#ifdef VLMQ_X86
// ---- AVX2 + FMA + F16C (8 lanes) ----
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace avx2 {
struct V {
  // 16 ymm registers: at most 8 accumulators per chunk
  static constexpr int W = 8, VT1 = 2, VT2 = 2, VT4 = 1;
  // a masked convert in place of shift + lookup/mask + convert: 20% faster at batch 1 (README)
  static constexpr bool PRESHIFT = true;
  typedef __m256 vf;
  typedef __m256i vu;
  typedef __m256 lut_t;
  static inline vu load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline vf zero() { return _mm256_setzero_ps(); }
  static inline vf set1(float a) { return _mm256_set1_ps(a); }
  static inline vu srl(vu v, int s) { return _mm256_srli_epi32(v, s); }
  static inline vu sll(vu v, int s) { return _mm256_slli_epi32(v, s); }
  static inline vu or_(vu a, vu b) { return _mm256_or_si256(a, b); }
  template <int B> static inline lut_t lut() {
    constexpr int m = (1 << B) - 1;  // vpermps ymm reads the low 3 index bits: a table for 2 and 3 bits
    return _mm256_setr_ps(0 & m, 1 & m, 2 & m, 3 & m, 4 & m, 5 & m, 6 & m, 7 & m);
  }
  template <int B> static inline vf lookup(vu v, lut_t l) {
    if (B <= 3) return _mm256_permutevar8x32_ps(l, v);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32((1 << B) - 1)));
  }
  template <int B> static inline vf decode(vu v, int sh, lut_t l) {
    if (sh) v = srl(v, sh);
    if (B > 3 && sh + B == 32) return _mm256_cvtepi32_ps(v);  // the top value of the word: no mask
    return lookup<B>(v, l);
  }
  template <int B> static inline vf masked(vu v, int sh) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(((1 << B) - 1) << sh)));
  }
  static inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
  static inline vf fnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
  static inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
  static inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
  static inline vf load_h(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static inline vf load_b(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static inline void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
  static inline vf loadf(const float* p) { return _mm256_loadu_ps(p); }
};
#include "gptq_cpu_body.h"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ---- AVX-512F (16 lanes) ----
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#endif
namespace avx512 {
struct V {
  static constexpr int W = 16, VT1 = 4, VT2 = 4, VT4 = 4;
  static constexpr bool PRESHIFT = false;
  typedef __m512 vf;
  typedef __m512i vu;
  typedef __m512 lut_t;
  static inline vu load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static inline vf zero() { return _mm512_setzero_ps(); }
  static inline vf set1(float a) { return _mm512_set1_ps(a); }
  static inline vu srl(vu v, int s) { return _mm512_srli_epi32(v, s); }
  static inline vu sll(vu v, int s) { return _mm512_slli_epi32(v, s); }
  static inline vu or_(vu a, vu b) { return _mm512_or_si512(a, b); }
  template <int B> static inline lut_t lut() {
    constexpr int m = (1 << B) - 1;  // vpermps zmm reads the low 4 index bits: a table for 2, 3 and 4 bits
    return _mm512_setr_ps(0 & m, 1 & m, 2 & m, 3 & m, 4 & m, 5 & m, 6 & m, 7 & m, 8 & m, 9 & m, 10 & m, 11 & m,
                          12 & m, 13 & m, 14 & m, 15 & m);
  }
  template <int B> static inline vf lookup(vu v, lut_t l) {
    if (B <= 4) return _mm512_permutexvar_ps(v, l);
    return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32((1 << B) - 1)));
  }
  template <int B> static inline vf decode(vu v, int sh, lut_t l) {
    if (sh) v = srl(v, sh);
    if (B > 4 && sh + B == 32) return _mm512_cvtepi32_ps(v);
    return lookup<B>(v, l);
  }
  template <int B> static inline vf masked(vu v, int sh) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(((1 << B) - 1) << sh)));
  }
  static inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
  static inline vf fnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
  static inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
  static inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
  static inline vf load_h(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static inline vf load_b(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
  static inline vf loadf(const float* p) { return _mm512_loadu_ps(p); }
};
#include "gptq_cpu_body.h"
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // VLMQ_X86

bool cpu_has(const std::string& isa) {
  if (isa == "generic") return true;
#ifdef VLMQ_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == "avx2") return avx2;
  if (isa == "avx512") return avx2 && __builtin_cpu_supports("avx512f");
#endif
  return false;
}

std::vector<std::string> isas() {  // best first
  std::vector<std::string> out;
  for (const char* i : {"avx512", "avx2", "generic"})
    if (cpu_has(i)) out.emplace_back(i);
  return out;
}

bool wants_preshift(const std::string& isa) {
#ifdef VLMQ_X86
  if (isa == "avx512") return avx512::V::PRESHIFT;
  if (isa == "avx2") return avx2::V::PRESHIFT;
#endif
  return generic::V::PRESHIFT;
}

Kernels pick(const std::string& isa, int64_t bits) {
#ifdef VLMQ_X86
  if (isa == "avx512") return avx512::kernels((int)bits);
  if (isa == "avx2") return avx2::kernels((int)bits);
#endif
  return generic::kernels((int)bits);
}

}  // namespace

namespace {

// Checks the arguments of both entry points; returns the instruction set to run.
std::string check_args(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& scales,
                       const torch::Tensor& zeros, int64_t bits, int64_t group, int64_t N, std::string isa,
                       torch::ScalarType xt = torch::kFloat32) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == xt && x.is_contiguous(), "x: contiguous ", xt, " [M, K]");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  const int64_t K = x.size(1);
  TORCH_CHECK(group % 32 == 0 && group > 0 && K % group == 0, "group must be a multiple of 32 dividing K");
  const int64_t G = K / group, nblocks = (N + NB - 1) / NB;
  TORCH_CHECK(qw.scalar_type() == torch::kInt32 && qw.is_contiguous() && qw.dim() == 3 && qw.size(0) == nblocks &&
              qw.size(1) * 32 == K * bits && qw.size(2) == NB, "qw: contiguous int32 [ceil(N/64), K*bits/32, 64]");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous() && scales.dim() == 3 &&
              scales.size(0) == nblocks && scales.size(1) == G && scales.size(2) == NB, "scales: contiguous float16 [ceil(N/64), G, 64]");
  TORCH_CHECK(zeros.scalar_type() == torch::kByte && zeros.is_contiguous() && zeros.sizes() == scales.sizes(),
              "zeros: contiguous uint8, shaped like scales");
  if (isa.empty()) isa = isas().front();
  TORCH_CHECK(cpu_has(isa), "instruction set '", isa, "' is not supported by this CPU/build");
  return isa;
}

// Runs fn(b0, b1) over the column blocks [0, nblocks) on `nt` threads. Dynamic schedule: each
// thread takes the next run of blocks from a shared counter, so a thread that the OS preempts (a
// busy machine) does not hold back a fixed share of the work.
template <typename F>
void over_blocks(int64_t nblocks, int64_t nt, F fn) {
  if (nt <= 1) {
    fn(0, nblocks);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t step = std::max<int64_t>(1, nblocks / (nt * 8));
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t b = next.fetch_add(step); b < nblocks; b = next.fetch_add(step)) fn(b, std::min(b + step, nblocks));
  });
}

Job make_job(const torch::Tensor& x, const float* xsum, int64_t group, int64_t N, const torch::Tensor& qw,
             const torch::Tensor& scales, const torch::Tensor& zeros, float* y) {
  const int64_t K = x.size(1);
  return Job{x.data_ptr<float>(), xsum, x.size(0), K, K / group, group, N,
             reinterpret_cast<const uint32_t*>(qw.data_ptr<int32_t>()),
             reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()), zeros.data_ptr<uint8_t>(), y};
}

}  // namespace

torch::Tensor gptq_gemm(torch::Tensor x, torch::Tensor qw, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                        int64_t group, int64_t N, std::string isa) {
  isa = check_args(x, qw, scales, zeros, bits, group, N, isa);
  const BlockFn fn = pick(isa, bits).block;
  const int64_t M = x.size(0), K = x.size(1), G = K / group, nblocks = (N + NB - 1) / NB;
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  std::vector<float> xsum(M * G, 0.f);
  std::vector<float> xpre;  // x[k] 2^-sh for the values the kernel decodes in place (see `preshifted`)
  if (wants_preshift(isa)) {
    float f[32];
    for (int j = 0; j < 32; ++j) {
      const int sh = (int)((bits * j) & 31);
      f[j] = (sh > 0 && sh + bits < 32 && !(bits == 3 && sh > 29)) ? std::ldexp(1.f, -sh) : 1.f;
    }
    xpre.resize(M * K);
    for (int64_t i = 0; i < M * K; ++i) xpre[i] = xp[i] * f[i % K % 32];
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) acc += xp[m * K + k];
      xsum[m * G + g] = acc;
    }
  constexpr int64_t MC = 64;  // rows per pass: x rows of one pass stay in cache while the blocks stream
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    Job job = make_job(x, xsum.data() + m0 * G, group, N, qw, scales, zeros, y.data_ptr<float>() + m0 * N);
    job.x = (xpre.empty() ? xp : xpre.data()) + m0 * K;
    job.M = std::min(MC, M - m0);
    // small products run on the calling thread: a fork-join costs more than they do (~1M
    // weight-rows, some tens of microseconds, per thread at least)
    const int64_t nt = std::min<int64_t>({(int64_t)at::get_num_threads(), nblocks, job.M * K * N >> 20});
    over_blocks(nblocks, nt, [&](int64_t b0, int64_t b1) { fn(job, b0, b1); });
  }
  return y;
}

// Prefill path: y = x W^T with W dequantized tile by tile. Below `split_from` rows (0: always) each
// thread takes `cols` column blocks
// at a time, dequantizes their rows in chunks of `kc` inputs into a float32 buffer of its own
// (cache-sized, never a dense copy of W), and multiplies it with torch's GEMM (MKL / oneDNN, on
// the calling thread: inside a parallel region it runs single-threaded). The decode costs one
// vector pass per weight, shared by all M rows, so at many rows the GEMM's speed is what counts.
torch::Tensor gptq_gemm_tiled(torch::Tensor x, torch::Tensor qw, torch::Tensor scales, torch::Tensor zeros,
                              int64_t bits, int64_t group, int64_t N, std::string isa, int64_t cols, int64_t kc,
                              int64_t split_from) {
  isa = check_args(x, qw, scales, zeros, bits, group, N, isa);
  TORCH_CHECK(cols >= 1 && kc >= 32, "cols >= 1 and kc >= 32");
  const DequantFn fn = pick(isa, bits).dequant;
  const int64_t M = x.size(0), K = x.size(1), nblocks = (N + NB - 1) / NB;
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  kc = std::min<int64_t>(K, kc / 32 * 32);
  const int64_t nunits = (nblocks + cols - 1) / cols;
  const Job job = make_job(x, nullptr, group, N, qw, scales, zeros, y.data_ptr<float>());
  const int64_t threads = at::get_num_threads();
  if (split_from > 0 && M >= split_from && threads > 1) {
    // Many rows: wide tiles shared by all threads. A GEMM call packs its rows of x once per call,
    // so per-thread tiles of 128 columns re-pack x for every 128 outputs (~10 % at M = 1024);
    // here all threads dequantize one tile of WIDE blocks together, then each multiplies its own
    // rows of x with it (two fork-joins per tile, a few microseconds against milliseconds of GEMM).
    constexpr int64_t WIDE = 8;
    const int64_t wb = std::min<int64_t>(nblocks, WIDE), rows_per = (M + threads - 1) / threads;
    auto tile = torch::empty({kc, wb * NB}, x.options());
    for (int64_t b0 = 0; b0 < nblocks; b0 += wb) {
      const int64_t b1 = std::min(nblocks, b0 + wb), n0 = b0 * NB, nb = std::min(N, b1 * NB) - n0;
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t k1 = std::min(K, k0 + kc);
        over_blocks(b1 - b0, std::min(threads, b1 - b0), [&](int64_t u0, int64_t u1) {
          for (int64_t u = u0; u < u1; ++u) fn(job, b0 + u, k0, k1, tile.data_ptr<float>() + u * NB, wb * NB);
        });
        auto t = tile.narrow(0, 0, k1 - k0).narrow(1, 0, nb);
        auto xk = x.narrow(1, k0, k1 - k0);
        at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
          for (int64_t ti = t0; ti < t1; ++ti) {
            const int64_t r0 = ti * rows_per, r1 = std::min(M, r0 + rows_per);
            if (r0 >= r1) continue;
            auto yr = y.narrow(0, r0, r1 - r0).narrow(1, n0, nb);
            auto xr = xk.narrow(0, r0, r1 - r0);
            if (k0 == 0) at::mm_out(yr, xr, t);
            else yr.addmm_(xr, t);
          }
        });
      }
    }
    return y;
  }
  const int64_t nt = std::min<int64_t>({threads, nunits, std::max<int64_t>(1, M * K * N >> 20)});
  over_blocks(nunits, nt, [&](int64_t u0, int64_t u1) {
    const int64_t width = cols * NB;
    auto tile = torch::empty({kc, width}, x.options());
    auto acc = torch::empty({M, width}, x.options());
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b0 = u * cols, b1 = std::min(nblocks, b0 + cols), w = (b1 - b0) * NB;
      auto accw = acc.narrow(1, 0, w);
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t k1 = std::min(K, k0 + kc);
        for (int64_t b = b0; b < b1; ++b) fn(job, b, k0, k1, tile.data_ptr<float>() + (b - b0) * NB, width);
        auto t = tile.narrow(0, 0, k1 - k0).narrow(1, 0, w);
        auto xk = x.narrow(1, k0, k1 - k0);
        if (k0 == 0) at::mm_out(accw, xk, t);
        else accw.addmm_(xk, t);
      }
      const int64_t n0 = b0 * NB, nb = std::min(N, b1 * NB) - n0;
      y.narrow(1, n0, nb).copy_(accw.narrow(1, 0, nb));
    }
  });
  return y;
}

// bfloat16 prefill path (machines whose bf16 GEMM is fast: AMX): y = x W^T for bf16 x, with W
// exact in two bf16 parts, W = W_hi + W_lo (split_bf16), as ONE GEMM over 2K inputs,
// [x | x] [W_hi; W_lo]^T: every product is exact and the GEMM accumulates in float32, so y is the
// reference's float32 result up to summation order, rounded once to bf16. A bf16 GEMM's output is
// rounded per call, hence one call over all of K, and a float32 bias joins it as 3 more inputs (ones
// times its 3 exact bf16 parts), added before the one rounding as the reference adds it.
// Below `split_from` rows (0: always) each thread takes `cols` column blocks at a time, dequantizes
// them in chunks of `kc` inputs (float32 scratch) into a [2K(+3), cols * 64] bf16 tile of its own and
// multiplies it with torch's GEMM (single-threaded inside the parallel region). From `split_from`
// rows all threads fill one tile of 8 blocks (512 columns) together and torch's GEMM multiplies it
// with all threads: a GEMM call re-reads (packs) all of x, so narrow tiles at many rows would pay
// that once per 64 outputs.
torch::Tensor gptq_gemm_tiled_bf16(torch::Tensor x, torch::Tensor qw, torch::Tensor scales, torch::Tensor zeros,
                                   int64_t bits, int64_t group, int64_t N, std::string isa, int64_t cols,
                                   int64_t kc, std::optional<torch::Tensor> bias, int64_t split_from) {
  isa = check_args(x, qw, scales, zeros, bits, group, N, isa, torch::kBFloat16);
  TORCH_CHECK(cols >= 1 && kc >= 32, "cols >= 1 and kc >= 32");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->dim() == 1 &&
                bias->size(0) == N, "bias: contiguous float32 [N]");
  const Kernels k = pick(isa, bits);
  const DequantFn fn = k.dequant;
  const SplitFn split = k.split;
  const int64_t M = x.size(0), K = x.size(1), nblocks = (N + NB - 1) / NB;
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  kc = std::min<int64_t>(K, kc / 32 * 32);
  const int64_t K2 = 2 * K + (has_bias ? 3 : 0);
  const auto x2 = has_bias ? torch::cat({x, x, torch::ones({M, 3}, x.options())}, 1) : torch::cat({x, x}, 1);
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  const Job job{nullptr, nullptr, M, K, K / group, group, N, reinterpret_cast<const uint32_t*>(qw.data_ptr<int32_t>()),
                reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()), zeros.data_ptr<uint8_t>(), nullptr};
  // blocks [b0, b1) into the columns from c0 of a [K2, ld] bf16 tile: W_hi rows, W_lo rows, bias rows
  auto fill = [&](uint16_t* tp, int64_t ld, int64_t c0, int64_t b0, int64_t b1, float* scratch) {
    const int64_t w = (b1 - b0) * NB;
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t k1 = std::min(K, k0 + kc);
      for (int64_t b = b0; b < b1; ++b) fn(job, b, k0, k1, scratch + (b - b0) * NB, w);
      for (int64_t r = 0; r < k1 - k0; ++r) split(scratch + r * w, w, tp + (k0 + r) * ld + c0, tp + (K + k0 + r) * ld + c0);
    }
    for (int64_t c = 0; has_bias && c < w; ++c) {  // b = b1 + b2 + b3 exactly (3 x 8 significant bits hold 24)
      float r = b0 * NB + c < N ? bp[b0 * NB + c] : 0.f;
      for (int i = 0; i < 3; ++i) {
        const at::BFloat16 h(r);  // round to nearest even
        tp[(2 * K + i) * ld + c0 + c] = h.x;
        r -= static_cast<float>(h);  // exact (Sterbenz)
      }
    }
  };
  const int64_t threads = at::get_num_threads();
  if (split_from > 0 && M >= split_from && threads > 1) {
    constexpr int64_t WIDE = 8;
    const int64_t wb = std::min<int64_t>(nblocks, WIDE);
    auto tile = torch::empty({K2, wb * NB}, x.options());
    uint16_t* tp = reinterpret_cast<uint16_t*>(tile.data_ptr<at::BFloat16>());
    for (int64_t b0 = 0; b0 < nblocks; b0 += wb) {
      const int64_t b1 = std::min(nblocks, b0 + wb), n0 = b0 * NB, nb = std::min(N, b1 * NB) - n0;
      over_blocks(b1 - b0, std::min(threads, b1 - b0), [&](int64_t u0, int64_t u1) {
        std::vector<float> scratch(kc * NB);
        for (int64_t u = u0; u < u1; ++u) fill(tp, wb * NB, u * NB, b0 + u, b0 + u + 1, scratch.data());
      });
      y.narrow(1, n0, nb).copy_(at::mm(x2, tile.narrow(1, 0, (b1 - b0) * NB)).narrow(1, 0, nb));
    }
    return y;
  }
  const int64_t nunits = (nblocks + cols - 1) / cols;
  const int64_t nt = std::min<int64_t>({threads, nunits, std::max<int64_t>(1, M * K * N >> 20)});
  over_blocks(nunits, nt, [&](int64_t u0, int64_t u1) {
    const int64_t width = cols * NB;
    std::vector<float> scratch(kc * width);
    auto tile = torch::empty({K2, width}, x.options());
    uint16_t* tp = reinterpret_cast<uint16_t*>(tile.data_ptr<at::BFloat16>());
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b0 = u * cols, b1 = std::min(nblocks, b0 + cols), n0 = b0 * NB, nb = std::min(N, b1 * NB) - n0;
      fill(tp, width, 0, b0, b1, scratch.data());
      y.narrow(1, n0, nb).copy_(at::mm(x2, tile.narrow(1, 0, (b1 - b0) * NB)).narrow(1, 0, nb));
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gptq_gemm", &gptq_gemm, "fused unpack-dequantize-matmul of GPTQ words in the blocked kernel layout (CPU)",
        pybind11::arg("x"), pybind11::arg("qw"), pybind11::arg("scales"), pybind11::arg("zeros"),
        pybind11::arg("bits"), pybind11::arg("group"), pybind11::arg("n"), pybind11::arg("isa") = "");
  m.def("gptq_gemm_tiled", &gptq_gemm_tiled,
        "prefill path: dequantize tiles of the blocked GPTQ words to float32 and multiply them with torch's GEMM",
        pybind11::arg("x"), pybind11::arg("qw"), pybind11::arg("scales"), pybind11::arg("zeros"),
        pybind11::arg("bits"), pybind11::arg("group"), pybind11::arg("n"), pybind11::arg("isa") = "",
        pybind11::arg("cols") = 2, pybind11::arg("kc") = 1024, pybind11::arg("split_from") = 0);
  m.def("gptq_gemm_tiled_bf16", &gptq_gemm_tiled_bf16,
        "bf16 prefill path: tiles of the blocked GPTQ words as exact bf16 pairs, one bf16 GEMM over [x | x]",
        pybind11::arg("x"), pybind11::arg("qw"), pybind11::arg("scales"), pybind11::arg("zeros"),
        pybind11::arg("bits"), pybind11::arg("group"), pybind11::arg("n"), pybind11::arg("isa") = "",
        pybind11::arg("cols") = 1, pybind11::arg("kc") = 256, pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("split_from") = 0);
  m.def("isas", &isas, "instruction sets this CPU can run, best first");
  m.attr("NB") = NB;
}
