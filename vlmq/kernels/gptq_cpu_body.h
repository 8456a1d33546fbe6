// The kernel body of gptq_cpu.cpp, written once over a vector "traits" type `V` and included once
// per instruction set inside that instruction set's namespace and `#pragma GCC target` region
// (AVX-512, AVX2+FMA+F16C, and plain C++ vector extensions), so that every copy is compiled for its
// own ISA in a single build and chosen at run time (see gptq_cpu.cpp for the layout and the maths).
//
// Not a standalone header: it expects `Job`, `Kernels`, `NB` and the system/intrinsics headers from the
// including file, and `V` in the enclosing namespace.

// Value j of a run of 32 is decoded without its shift, as q 2^sh, when the traits ask for it
// (V::PRESHIFT) and it lies inside one word below the top bits: the caller then passes x[k] 2^-sh
// in place of x[k] (exact: powers of two), and the product is x q as before, bit for bit.
template <int BITS>
constexpr bool preshifted(int j) {
  const int sh = (BITS * j) & 31;
  return V::PRESHIFT && sh > 0 && sh + BITS < 32 && !(BITS == 3 && sh > 29);
}

// The value at bit `sh` of word `word` of a run, for the W columns at p (p + word * NB: the word
// row): q, or q 2^sh in place when `pre` (no shift; see `preshifted`). `word`, `sh` and `pre` are
// constants once the caller's loop over the run is unrolled.
template <int BITS>
__attribute__((always_inline)) inline typename V::vf value(const uint32_t* p, int word, int sh, bool pre,
                                                           typename V::lut_t lut) {
  const typename V::vu u = V::load(p + word * NB);
  if (BITS == 3 && sh > 29)  // values 10 and 21 of a 3-bit run straddle two words
    return V::template lookup<BITS>(V::or_(V::srl(u, sh), V::sll(V::load(p + (word + 1) * NB), 32 - sh)), lut);
  if (pre) return V::template masked<BITS>(u, sh);
  return V::template decode<BITS>(u, sh, lut);
}

// One chunk: MT rows of x (from row m0) times the VT * V::W columns of block `b` starting at column
// c0 of the block. Group sums are accumulated in registers; the scale and zero point are applied
// once per group: acc += s * sum_k(x_k q_k) - (z s) * sum_k(x_k).
template <int BITS, int MT, int VT>
inline void chunk(const Job& a, int64_t b, int64_t m0, int c0, float* out) {
  constexpr int W = V::W;
  constexpr int NA = MT == 1 ? 2 : 1;  // batch 1: two accumulator sets (even/odd k) for more FMA chains
  const int64_t R = a.K * BITS / 32, rpg = a.group / 32;
  const uint32_t* qb = a.qw + b * R * NB + c0;
  const uint16_t* sb = a.s + b * a.G * NB + c0;
  const uint8_t* zb = a.z + b * a.G * NB + c0;
  const float* x = a.x + m0 * a.K;
  const float* xs = a.xsum + m0 * a.G;
  const typename V::lut_t lut = V::template lut<BITS>();
  // the running sums over groups live in `out` (touched once per group), so that the registers
  // hold only the group's partial sums, the decoded weights and x: no spills in the inner loop
  for (int mi = 0; mi < MT; ++mi)
    for (int t = 0; t < VT; ++t) V::store(out + mi * NB + c0 + t * W, V::zero());
  for (int64_t g = 0; g < a.G; ++g) {
    typename V::vf ag[NA][MT][VT];
    for (int h = 0; h < NA; ++h)
      for (int mi = 0; mi < MT; ++mi)
        for (int t = 0; t < VT; ++t) ag[h][mi][t] = V::zero();
    for (int64_t r = 0; r < rpg; ++r) {
      const int64_t run = g * rpg + r;             // 32 consecutive k = BITS word rows
      const uint32_t* w = qb + run * BITS * NB;
      const float* xk = x + run * 32;
#pragma GCC unroll 32
      for (int j = 0; j < 32; ++j) {
        const int off = BITS * j, word = off >> 5, sh = off & 31;  // constants once unrolled
        typename V::vf xv[MT];
        for (int mi = 0; mi < MT; ++mi) xv[mi] = V::set1(xk[mi * a.K + j]);
        for (int t = 0; t < VT; ++t) {
          const typename V::vf q = value<BITS>(w + t * W, word, sh, preshifted<BITS>(j), lut);
          for (int mi = 0; mi < MT; ++mi) ag[j % NA][mi][t] = V::fma(xv[mi], q, ag[j % NA][mi][t]);
        }
      }
    }
    for (int t = 0; t < VT; ++t) {
      const typename V::vf sv = V::load_h(sb + g * NB + t * W);
      const typename V::vf zs = V::mul(sv, V::load_b(zb + g * NB + t * W));
      for (int mi = 0; mi < MT; ++mi) {
        typename V::vf sum = ag[0][mi][t];
        if (NA == 2) sum = V::add(sum, ag[NA - 1][mi][t]);
        float* o = out + mi * NB + c0 + t * W;
        V::store(o, V::fnma(zs, V::set1(xs[mi * a.G + g]), V::fma(sv, sum, V::loadf(o))));
      }
    }
  }
}

template <int BITS, int MT, int VT>
inline void rows(const Job& a, int64_t b, int64_t m0, float* out) {
  for (int c0 = 0; c0 < NB; c0 += VT * V::W) chunk<BITS, MT, VT>(a, b, m0, c0, out);
  const int64_t n0 = b * NB, nb = std::min<int64_t>(NB, a.N - n0);
  for (int mi = 0; mi < MT; ++mi) std::memcpy(a.y + (m0 + mi) * a.N + n0, out + mi * NB, nb * sizeof(float));
}

// Blocks [b0, b1) of NB output columns, every row of the job.
template <int BITS>
void run_blocks(const Job& a, int64_t b0, int64_t b1) {
  alignas(64) float out[4 * NB];
  for (int64_t b = b0; b < b1; ++b) {
    int64_t m0 = 0;
    for (; m0 + 4 <= a.M; m0 += 4) rows<BITS, 4, V::VT4>(a, b, m0, out);
    for (; m0 + 2 <= a.M; m0 += 2) rows<BITS, 2, V::VT2>(a, b, m0, out);
    for (; m0 < a.M; ++m0) rows<BITS, 1, V::VT1>(a, b, m0, out);
  }
}

// Prefill path: rows [k0, k1) (multiples of 32) of block b dequantized to float32,
// out[(k - k0) * ld + c] = (q[k, c] - z[g(k), c]) * s[g(k), c] for the block's NB columns (the
// same float32 operations as the reference backend, so the same values). A GEMM
// library multiplies these tiles (gptq_gemm_tiled in gptq_cpu.cpp): at many rows the decode is
// paid once per weight, not once per weight and row group as in `chunk`.
template <int BITS>
void dequant_rows(const Job& a, int64_t b, int64_t k0, int64_t k1, float* out, int64_t ld) {
  constexpr int W = V::W;
  const int64_t R = a.K * BITS / 32, rpg = a.group / 32;
  const uint32_t* qb = a.qw + b * R * NB;
  const uint16_t* sb = a.s + b * a.G * NB;
  const uint8_t* zb = a.z + b * a.G * NB;
  const typename V::lut_t lut = V::template lut<BITS>();
  for (int64_t run = k0 / 32; run < k1 / 32; ++run) {
    const int64_t g = run / rpg;
    const uint32_t* w = qb + run * BITS * NB;
    float* o = out + (run * 32 - k0) * ld;
    for (int t = 0; t < NB / W; ++t) {
      const typename V::vf sv = V::load_h(sb + g * NB + t * W);
      const typename V::vf nz = V::fnma(V::set1(1.f), V::load_b(zb + g * NB + t * W), V::zero());  // -z
#pragma GCC unroll 32
      for (int j = 0; j < 32; ++j) {
        const int off = BITS * j, word = off >> 5, sh = off & 31;
        const typename V::vf q = value<BITS>(w + t * W, word, sh, false, lut);
        V::store(o + j * ld + t * W, V::mul(V::add(q, nz), sv));  // (q - z) s: the reference's rounding
      }
    }
  }
}

// bfloat16 prefill path: float32 values v split into hi = bf16(v) (round to nearest even, as torch's
// conversion) and lo = bf16(v - hi), so that hi + lo = v exactly for the dequantized weights of 2-4
// bits (v = (q - z) s has at most 4 + 11 significant bits: hi keeps 8, the rest fits lo's 8) and to
// ~2^-17 relative at 8 bits. A plain loop: compiled under each ISA's target, GCC vectorizes it.
inline void split_bf16(const float* v, int64_t n, uint16_t* hi, uint16_t* lo) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b, c;
    std::memcpy(&b, v + i, 4);
    const uint32_t h = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
    float hf;
    std::memcpy(&hf, &h, 4);
    const float r = v[i] - hf;  // exact (Sterbenz: hf lies within a factor 2 of v)
    std::memcpy(&c, &r, 4);
    hi[i] = static_cast<uint16_t>(h >> 16);
    lo[i] = static_cast<uint16_t>((c + 0x7FFFu + ((c >> 16) & 1u)) >> 16);
  }
}

// This ISA's functions for `bits`-bit weights (null block/dequant for other widths).
inline Kernels kernels(int bits) {
  switch (bits) {
    case 2: return {&run_blocks<2>, &dequant_rows<2>, &split_bf16};
    case 3: return {&run_blocks<3>, &dequant_rows<3>, &split_bf16};
    case 4: return {&run_blocks<4>, &dequant_rows<4>, &split_bf16};
    case 8: return {&run_blocks<8>, &dequant_rows<8>, &split_bf16};
    default: return {nullptr, nullptr, &split_bf16};
  }
}
