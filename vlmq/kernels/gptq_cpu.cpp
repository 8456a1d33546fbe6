// Fused unpack-dequantize-matmul for GPTQ-packed weights on the CPU (2/3/4/8 bits).
//
// y[m, n] = sum_g s[g, n] * (sum_{k in g} x[m, k] * q[k, n]) - zs[g, n] * xsum[m, g]
// with zs = z * s and xsum[m, g] = sum_{k in g} x[m, k]: the integer weights are decoded from the
// packed words into registers and never written out as a dense matrix, so the kernel reads
// bits/32 of the bytes a float32 matmul reads. Groups must be contiguous runs of `group` input
// columns (act_order checkpoints are permuted once at load time, see vlmq/qlinear.py).
//
// qweight layout (GPTQ): int32 [K * BITS / 32, N], values packed along K as one little-endian bit
// stream per output column (3 bits: 32 values in 3 words, values 10 and 21 straddle two words).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int NB = 64;  // output columns per tile (4 AVX-512 / 8 AVX2 float vectors)
constexpr int MT = 8;   // rows of x per tile

// qv[n] = value j (0..31) of the 32-value run held in the BITS word rows `rows` (columns n < nb).
// Every branch is a plain loop over n with loop-invariant shifts: it vectorizes.
template <int BITS>
inline void decode(const uint32_t* const* rows, int j, int nb, float* __restrict qv) {
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const int off = BITS * j, word = off >> 5, shift = off & 31;
  const uint32_t* __restrict w = rows[word];
  if (BITS == 3 && shift > 29) {  // straddles two words (values 10 and 21)
    const uint32_t* __restrict w2 = rows[word + 1];
    const int back = 32 - shift;
    #pragma omp simd
    for (int n = 0; n < nb; ++n) qv[n] = (float)(int32_t)(((w[n] >> shift) | (w2[n] << back)) & MASK);
  } else {
    #pragma omp simd
    for (int n = 0; n < nb; ++n) qv[n] = (float)(int32_t)((w[n] >> shift) & MASK);
  }
}

// Full 64-column tiles, MTT rows of x at a time: GCC vector extensions (compiled to AVX-512,
// AVX2, ... by -march=native) with the accumulators held in registers.
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
constexpr int LANES = 16, VT = NB / LANES;

inline vu load_u(const uint32_t* p) { vu v; __builtin_memcpy(&v, p, sizeof(v)); return v; }

template <int BITS, int MTT>
inline void tile(const float* x, int64_t K, const uint32_t* qw, int64_t N, const float* s, const float* zs,
                 const float* xsum, int64_t G, int64_t group, int64_t n0, float* y) {
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const int64_t runs_per_group = group / 32;
  vf acc[MTT][VT] = {};
  for (int64_t g = 0; g < G; ++g) {
    vf ag[MTT][VT] = {};
    for (int64_t r = 0; r < runs_per_group; ++r) {
      const int64_t run = g * runs_per_group + r;
      const uint32_t* base = qw + run * BITS * N + n0;
      const int64_t k0 = run * 32;
#pragma GCC unroll 32
      for (int j = 0; j < 32; ++j) {
        const int off = BITS * j, word = off >> 5, shift = off & 31;
        float xv[MTT];
        for (int mi = 0; mi < MTT; ++mi) xv[mi] = x[mi * K + k0 + j];
#pragma GCC unroll 4
        for (int t = 0; t < VT; ++t) {
          vu w = load_u(base + word * N + t * LANES) >> shift;
          if (BITS == 3 && shift > 29) w |= load_u(base + (word + 1) * N + t * LANES) << (32 - shift);
          const vf q = __builtin_convertvector((vi)(w & MASK), vf);
          for (int mi = 0; mi < MTT; ++mi) ag[mi][t] += xv[mi] * q;
        }
      }
    }
    for (int t = 0; t < VT; ++t) {
      vf sv, zv;
      __builtin_memcpy(&sv, s + g * N + n0 + t * LANES, sizeof(sv));
      __builtin_memcpy(&zv, zs + g * N + n0 + t * LANES, sizeof(zv));
      for (int mi = 0; mi < MTT; ++mi) acc[mi][t] += sv * ag[mi][t] - zv * xsum[mi * G + g];
    }
  }
  for (int mi = 0; mi < MTT; ++mi)
    for (int t = 0; t < VT; ++t) __builtin_memcpy(y + mi * N + n0 + t * LANES, &acc[mi][t], sizeof(vf));
}

template <int BITS>
void gemm(const float* x, int64_t M, int64_t K, const uint32_t* qw, int64_t N, const float* s,
          const float* zs, int64_t group, float* y) {
  const int64_t G = K / group;
  std::vector<float> xsum(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsum[m * G + k / group] += x[m * K + k];
  // a "run" = 32 consecutive K values = BITS word rows
  const int64_t runs_per_group = group / 32;
  const int64_t nblocks = (N + NB - 1) / NB;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float acc[MT][NB];
    alignas(64) float accg[MT][NB];
    alignas(64) float qv[NB];
    for (int64_t nb_i = b0; nb_i < b1; ++nb_i) {
      const int64_t n0 = nb_i * NB;
      const int nb = (int)std::min<int64_t>(NB, N - n0);
      if (nb == NB) {
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4)
          tile<BITS, 4>(x + m0 * K, K, qw, N, s, zs, xsum.data() + m0 * G, G, group, n0, y + m0 * N);
        for (; m0 < M; ++m0)
          tile<BITS, 1>(x + m0 * K, K, qw, N, s, zs, xsum.data() + m0 * G, G, group, n0, y + m0 * N);
        continue;
      }
      for (int64_t m0 = 0; m0 < M; m0 += MT) {
        const int mt = (int)std::min<int64_t>(MT, M - m0);
        for (int mi = 0; mi < mt; ++mi)
          for (int n = 0; n < NB; ++n) acc[mi][n] = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          for (int mi = 0; mi < mt; ++mi)
            for (int n = 0; n < NB; ++n) accg[mi][n] = 0.f;
          for (int64_t r = 0; r < runs_per_group; ++r) {
            const int64_t run = g * runs_per_group + r;
            const uint32_t* rows[BITS];
            for (int i = 0; i < BITS; ++i) rows[i] = qw + (run * BITS + i) * N + n0;
            const int64_t k0 = run * 32;
            for (int j = 0; j < 32; ++j) {
              decode<BITS>(rows, j, nb, qv);
              for (int mi = 0; mi < mt; ++mi) {
                const float xv = x[(m0 + mi) * K + k0 + j];
                float* __restrict a = accg[mi];
                #pragma omp simd
                for (int n = 0; n < nb; ++n) a[n] += xv * qv[n];
              }
            }
          }
          const float* sg = s + g * N + n0;
          const float* zg = zs + g * N + n0;
          for (int mi = 0; mi < mt; ++mi) {
            const float xs = xsum[(m0 + mi) * G + g];
            for (int n = 0; n < nb; ++n) acc[mi][n] += sg[n] * accg[mi][n] - zg[n] * xs;
          }
        }
        for (int mi = 0; mi < mt; ++mi)
          for (int n = 0; n < nb; ++n) y[(m0 + mi) * N + n0 + n] = acc[mi][n];
      }
    }
  });
}

}  // namespace

torch::Tensor gptq_gemm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zs,
                        int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(qweight.scalar_type() == torch::kInt32 && qweight.is_contiguous(), "qweight: contiguous int32");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && zs.scalar_type() == torch::kFloat32 &&
              scales.is_contiguous() && zs.is_contiguous(), "scales/zs: contiguous float32 [G, N]");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(1);
  TORCH_CHECK(group % 32 == 0 && K % group == 0, "group must be a multiple of 32 dividing K");
  TORCH_CHECK(qweight.size(0) * 32 == K * bits, "qweight rows do not match K and bits");
  TORCH_CHECK(scales.size(0) == K / group && scales.size(1) == N, "scales shape");
  auto y = torch::empty({M, N}, x.options());
  const auto* qw = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  switch (bits) {
    case 2: gemm<2>(x.data_ptr<float>(), M, K, qw, N, scales.data_ptr<float>(), zs.data_ptr<float>(), group, y.data_ptr<float>()); break;
    case 3: gemm<3>(x.data_ptr<float>(), M, K, qw, N, scales.data_ptr<float>(), zs.data_ptr<float>(), group, y.data_ptr<float>()); break;
    case 4: gemm<4>(x.data_ptr<float>(), M, K, qw, N, scales.data_ptr<float>(), zs.data_ptr<float>(), group, y.data_ptr<float>()); break;
    case 8: gemm<8>(x.data_ptr<float>(), M, K, qw, N, scales.data_ptr<float>(), zs.data_ptr<float>(), group, y.data_ptr<float>()); break;
    default: TORCH_CHECK(false, "bits must be 2, 3, 4 or 8");
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gptq_gemm", &gptq_gemm, "fused unpack-dequantize-matmul of GPTQ-packed weights (CPU)");
}
