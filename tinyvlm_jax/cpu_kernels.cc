// XLA:CPU kernels (built and registered by tinyvlm_jax/cpu_kernels.py): weight-only quantized
// GEMVs for tinyvlm_jax/quantize.py, the float32 GEMVs of a decode step, the attention of a decode
// step and of a prefill for tinyvlm_jax/models/qwen2.py and the vision tower's attention for
// tinyvlm_jax/models/siglip.py.
//
// Float32 GEMV. TinyvlmGemvF32(x [M, K], w [K, N]) -> y [M, N] for a decode step's Dense layers, on
// the kernel as Flax stores it. XLA:CPU's dot packs the weights before using them: the full-size
// LLM's MLP weights went through it at 15.6 GB/s, against 20.1 GB/s for this kernel, which reads
// each weight once in order (medians of 8 rounds, the two in turn in one process; in a profiled
// decode step, XLA's dots read them at 10-14 GB/s).
//
// Tied LM head. TinyvlmGemvF32T(x [M, K], w [N, K]) -> y [M, N] for the float32 tied head of a
// batched decode step, whose weights are the embedding table [V, D] (rows of w dotted with x).
// XLA's dot reads the 545 MB table at the memory's speed for one row of x (and stays in use there:
// this kernel and its variants tried were 5-20% slower at one row), but for 8 rows it took 61-87 ms; this kernel reads each block of
// 8 table rows once for all rows of x: 32-43 ms (151,936 x 896, 2 threads, the two in turn in one
// process, by the machine's phase). Whole float32 decodes of the full-size LLM (64 steps after an
// 832-token prefill, in turn in one process, the same tokens): batch 8 from 34.8 to 46.4 tok/s and,
// in a slower phase, from 32.6 to 39.0; batch 4 from 24.6 to 30.5 (medians of 4-6 rounds, the
// kernel faster in every round).
//
// Quantized layers. XLA:CPU converts an int8 dot operand to float32 in memory before the dot (about 0.3 G
// weights/s here), so decoding with int8 weights would be slower than float32. These kernels read
// the packed weights once, dequantize in registers, and split the rows over XLA's intra-op pool
// (int4 multiplies in integers, with x rounded to int16 per group: see RowsI4). An int8 kernel in
// integers as well ran no faster here: int8 streams its weights at the memory's speed already.
// With several rows of x (a batched decode), the int8 kernel converts each weight vector once for
// up to 4 rows (TileI8): a batch-8 decode of the full-size int8 LLM went from 61 to 79 tok/s
// (medians of 4 rounds, the two kernels in turn in one process). The int4 kernel likewise unpacks
// each 32 bytes of nibbles once for up to 4 rows (TileI4, with x's runs widened so that its madds
// read them from memory): the tied int4 head at 8 rows from 32.5 to 22.1 ms, and a batch-8 decode
// of the full-size int4 LLM from 66.4 to 76.8 tok/s (4 rounds, faster in each; the same tokens).
//
// Weights are stored in row tiles so that a tile is one contiguous stream (N outputs, K inputs):
//   int8: q int8 [N/8, K/8, 8, 8]     tile (i, j) holds rows 8i..8i+7, columns 8j..8j+7
//         scale f32 [N]               W[n, k] = scale[n] * q
//   int4: p uint8 [N/8, K/32, 8, 16]  tile (i, j): rows 8i..8i+7, columns 32j..32j+31; byte b of a
//         row holds column b in its low nibble and column b + 16 in its high nibble
//         scale bf16 [N, K/G]         W[n, k] = scale[n, k / G] * (nibble - 8)
//
// Handlers: TinyvlmGemv{I8,I4}(x [M, K] f32, (weights, scale) pairs...) -> one y [M, N_i] f32 per
// pair, for few rows of x (decode); TinyvlmDequant{I8,I4}(x, weights, scale) -> W [N, K] f32 (prefill
// then uses XLA's dot; x only orders the call: see DequantI8); TinyvlmToBf16(x, w) -> w in bfloat16
// (a prefill's bfloat16 matmuls, ordered after x likewise). A GEMV call takes every weight that
// multiplies one x (an attention layer's q, k and v; an MLP's gate and up) and splits their rows
// together over the pool: the small k and v
// (115 KB each in int8) alone took 20 us a call, 5.6 GB/s, as the pool started, the memory stream
// ramped up and both finished. Whole decodes of the full-size LLM (64 steps after an 832-token
// prefill, grouped calls against one call per weight in turn in one process, the same tokens): int8
// batch 1 32.9 -> 33.6 tok/s (40 rounds, faster in 23), int4 batch 1 49.0 -> 50.1 (30 rounds, 17),
// int8 batch 8 63.3 -> 64.2 (16 rounds, 9).
//
// Decode attention. XLA:CPU runs a decode step's attention (a few MFLOP per layer) as a handful of
// small fusions and dots at 0.34-0.46 ms per layer of 1088 slots, several times what its cache
// reads take. TinyvlmDecodeAttention does it in one task per (row, chunk of 128 slots), all KV heads
// together, each pass over the chunk visiting a slot once for every head, and combines the chunks.
// 24 layers' caches at 896 slots: 2.2-2.8 ms against XLA's 8.7-12 ms for one row, 20 against 66 ms
// for 8 rows. Against the kernel before it, which ran one head's passes after the other's (in turn
// in one process): 2.65 -> 2.15 ms for one row, 22.0 -> 15.2 ms for 8 rows; whole decodes of the
// full-size int8 LLM (64 steps after an 832-token prefill, the same tokens) 31.2 -> 32.3 tok/s at
// batch 1 (8 rounds) and 61.3 -> 68.9 tok/s at batch 8 (8 rounds, faster in 7).
//
// Vision attention. SigLIP's [P, P] scores per view and head (P = 576) take XLA 104-127 ms per layer
// for 5 views; TinyvlmAttention computes them in blocks of queries that stay in L2, with 6x16
// register tiles for both products (12x16 with AVX-512), in 42-49 ms (the two timed in turn in one
// process, AVX2).
//
// Prefill attention. TinyvlmChunkAttention is the same scheme for a prompt chunk against the KV
// cache, with grouped-query heads and a mask: each block of queries computes only the key columns
// that one of its queries sees. XLA computed all of them (the masked half of the causal scores and
// the cache's empty slots): 42-45 ms per layer of an 832- or 896-token prefill, against 13 ms.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTileRows = 8;
constexpr int64_t kBlocksPerThread = 2;
constexpr int kPrefetchBytes = 1024;

// Runs body(chunk) for chunk in [0, n): the caller and up to num_threads - 1 pool tasks claim chunks
// from one counter, so the call completes even when every pool thread is busy with other work.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& body) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, n, &body]() {
    int64_t i;
    while ((i = shared->next.fetch_add(1)) < n) {
      body(i);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (shared->done.load(std::memory_order_acquire) < n) _mm_pause();
}

// N rows (a multiple of kTileRows) in kBlocksPerThread blocks per pool thread: each block is one
// contiguous stretch of the tiled weights. Against blocks of 64 rows, the full-size LLM's MLP weights
// streamed 3-7% faster (int8 and int4, the two timed in turn in one process).
template <typename F>
void ForRowBlocks(ffi::ThreadPool& pool, int64_t N, const F& rows) {
  if (N <= 0) return;
  const int64_t split = std::max<int64_t>(1, kBlocksPerThread * pool.num_threads());
  const int64_t per = (N + kTileRows * split - 1) / (kTileRows * split) * kTileRows;
  ParallelFor(pool, (N + per - 1) / per, [&](int64_t c) { rows(c * per, std::min(N, (c + 1) * per)); });
}

// a[0..7] (8 partial-sum vectors, one per row) -> one vector of the 8 row sums.
inline __m256 ReduceRows(const __m256 a[8]) {
  __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

inline float Bf16(uint16_t v) {  // bfloat16 bits -> float32 (exact)
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline __m256 LoadI8(const int8_t* p) {  // 8 int8 -> 8 float32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// y[r0..r1) for one row of x; int8 tiles.
void RowsI8(const float* x, int64_t K, const int8_t* q, const float* scale, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r += kTileRows) {
    const int8_t* t = q + r * K;
    __m256 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8, t += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(t + kPrefetchBytes), _MM_HINT_T0);
      __m256 xv = _mm256_loadu_ps(x + k);
      for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(LoadI8(t + 8 * j), xv, a[j]);
    }
    _mm256_storeu_ps(y + r, _mm256_mul_ps(ReduceRows(a), _mm256_loadu_ps(scale + r)));
  }
}

// y[m, r..r+8) for MB rows of x (x [MB, K], y rows ldy apart) and the int8 tile of rows r..r+7 (t):
// each converted weight vector serves all MB rows (RowsI8 is the one-row kernel). Two tile rows at a
// time keep the 2 MB sums, 2 weight vectors and a row of x in registers. The sums are added in
// RowsI8's order, so each row's result is the same bit for bit.
template <int MB>
void TileI8(const float* x, int64_t K, const int8_t* t, const float* scale, float* y, int64_t ldy) {
  __m256 sums[MB][8];
  for (int j = 0; j < 8; j += 2) {
    __m256 a[MB][2];
    for (int m = 0; m < MB; ++m) a[m][0] = a[m][1] = _mm256_setzero_ps();
    const int8_t* tk = t + j * 8;
    for (int64_t k = 0; k < K; k += 8, tk += 64) {
      if (j == 0) _mm_prefetch(reinterpret_cast<const char*>(tk + kPrefetchBytes), _MM_HINT_T0);
      const __m256 w0 = LoadI8(tk), w1 = LoadI8(tk + 8);
      for (int m = 0; m < MB; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + k);
        a[m][0] = _mm256_fmadd_ps(w0, xv, a[m][0]);
        a[m][1] = _mm256_fmadd_ps(w1, xv, a[m][1]);
      }
    }
    for (int m = 0; m < MB; ++m) sums[m][j] = a[m][0], sums[m][j + 1] = a[m][1];
  }
  const __m256 sv = _mm256_loadu_ps(scale);
  for (int m = 0; m < MB; ++m) _mm256_storeu_ps(y + m * ldy, _mm256_mul_ps(ReduceRows(sums[m]), sv));
}

// One row's 16 packed bytes -> its 32 nibbles (0..15) as 4 x 8 float32, in column order.
inline void UnpackI4(const uint8_t* p, __m256 w[4]) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i mask = _mm_set1_epi8(0x0F);
  __m128i lo = _mm_and_si128(b, mask);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

// The int4 GEMV multiplies in integers: each group of G inputs of x is rounded to int16 with its own
// scale (max |x| / 32767, a relative error of at most 1.5e-5 of the group's largest input, far
// below the int4 weights' own), and _mm256_madd_epi16 multiplies 16 nibbles by 16 of them at a
// time. That takes half the instructions of converting every nibble to float32 (the float kernel
// ran at 15-17 G weights/s, bound by the conversions rather than by memory).
//
// Input layout (PrepareI4Input): per 32 columns c..c+31, four runs of 8 int16 in the order the
// nibbles come out of a 16-bit lane of the packed bytes (bytes 2i, 2i+1 of a row hold columns 2i,
// 2i+16 and 2i+1, 2i+17): A[i] = x[c+2i], B[i] = x[c+2i+16], C[i] = x[c+2i+1], D[i] = x[c+2i+17].
struct I4Input {
  int16_t* q;     // [K] in the order above
  float* scale;   // [K / G]: x ~= q * scale within each group
  int32_t* sum2;  // [K / G]: 2 * sum of q over the group (the nibbles' offset of 8, over 4 lanes per row)
};

void PrepareI4Input(const float* x, int64_t K, int64_t G, const I4Input& in) {
  for (int64_t g = 0; g < K / G; ++g) {
    const float* xg = x + g * G;
    float m = 0.f;
    bool finite = true;
    for (int64_t k = 0; k < G; ++k) {
      m = std::max(m, std::fabs(xg[k]));
      finite &= std::fabs(xg[k]) <= 3.4e38f;  // false for inf and NaN
    }
    const float inv = finite && m > 0.f ? 32767.f / m : 0.f;
    in.scale[g] = finite ? m / 32767.f : NAN;  // a non-finite input makes the group's products NaN
    int32_t sum = 0;
    for (int64_t c = 0; c < G; c += 32) {
      int16_t* out = in.q + g * G + c;
      for (int i = 0; i < 8; ++i) {
        const int16_t v[4] = {static_cast<int16_t>(std::lrint(xg[c + 2 * i] * inv)),
                              static_cast<int16_t>(std::lrint(xg[c + 2 * i + 16] * inv)),
                              static_cast<int16_t>(std::lrint(xg[c + 2 * i + 1] * inv)),
                              static_cast<int16_t>(std::lrint(xg[c + 2 * i + 17] * inv))};
        for (int j = 0; j < 4; ++j) {
          out[8 * j + i] = v[j];
          sum += v[j];
        }
      }
    }
    in.sum2[g] = 2 * sum;
  }
}

// total[j] (lanes 0-3: 4 partial sums of row 2j, lanes 4-7: of row 2j+1) -> the 8 rows' sums in order
// (the hadds give [r0, r2, r4, r6 | r1, r3, r5, r7]).
inline __m256 PairSums(const __m256 total[4]) {
  const __m256 sum = _mm256_hadd_ps(_mm256_hadd_ps(total[0], total[1]), _mm256_hadd_ps(total[2], total[3]));
  return _mm256_permutevar8x32_ps(sum, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// y[r0..r1) for one row of x (prepared); int4 tiles with group size G. A 32-byte load holds rows
// 2j and 2j+1 of a tile (16 bytes each, one per 128-bit half); its 16-bit lanes give the four
// nibble vectors by shifts and masks, and acc[j] (int32) gathers 4 partial sums per row. At the
// end of a group, acc - 2 sum2 (the offset of 8) goes to float with scale[row, g] * x's scale.
// Overflow: a lane adds 8 products of at most 15 * 32767 per 32 columns, 16 M for G = 128.
void RowsI4(const I4Input& in, int64_t K, int64_t G, const uint8_t* p, const uint16_t* scale, float* y, int64_t r0,
            int64_t r1) {
  const int64_t groups = K / G;
  const __m256i low4 = _mm256_set1_epi16(0x000F);
  for (int64_t r = r0; r < r1; r += kTileRows) {
    const uint8_t* t = p + r * (K / 2);
    const uint16_t* s = scale + r * groups;
    __m256 total[4];
    for (int j = 0; j < 4; ++j) total[j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m256i acc[4];
      for (int j = 0; j < 4; ++j) acc[j] = _mm256_setzero_si256();
      for (int64_t k = g * G; k < (g + 1) * G; k += 32, t += 128) {
        _mm_prefetch(reinterpret_cast<const char*>(t + kPrefetchBytes), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(t + kPrefetchBytes + 64), _MM_HINT_T0);
        const __m128i* xb = reinterpret_cast<const __m128i*>(in.q + k);
        const __m256i xa = _mm256_broadcastsi128_si256(_mm_loadu_si128(xb));
        const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128(xb + 1));
        const __m256i xo = _mm256_broadcastsi128_si256(_mm_loadu_si128(xb + 2));
        const __m256i xoh = _mm256_broadcastsi128_si256(_mm_loadu_si128(xb + 3));
        for (int j = 0; j < 4; ++j) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 32 * j));
          __m256i a = _mm256_madd_epi16(_mm256_and_si256(v, low4), xa);
          a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4), xh));
          a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 8), low4), xo));
          a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_srli_epi16(v, 12), xoh));
          acc[j] = _mm256_add_epi32(acc[j], a);
        }
      }
      const __m256i offset = _mm256_set1_epi32(in.sum2[g]);
      const float xs = in.scale[g];
      for (int j = 0; j < 4; ++j) {
        const __m256 sv = _mm256_set_m128(_mm_set1_ps(Bf16(s[(2 * j + 1) * groups + g]) * xs),
                                          _mm_set1_ps(Bf16(s[2 * j * groups + g]) * xs));
        total[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[j], offset)), sv, total[j]);
      }
    }
    _mm256_storeu_ps(y + r, PairSums(total));
  }
}

// x's int16 inputs (I4Input::q) with each run of 8 written twice, so that a 32-byte load gives a
// run in both 128-bit halves (the madd of TileI4 then reads it straight from memory).
void WidenI4Input(const int16_t* q, int64_t K, int16_t* wide) {
  for (int64_t c = 0; c < K; c += 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(wide + 2 * c), _mm256_broadcastsi128_si256(v));
  }
}

// y[m, r..r+8) for MB rows of x (in[m], wide[m]: prepared, widened) and the int4 tile of rows
// r..r+7 (t, its scales s): RowsI4's sums in RowsI4's order (the integer sums are exact, the float
// ones are added per group in the same order), so a row gets the same bits as alone. Each 32-byte
// load of nibbles is unpacked once for all MB rows; one pair of tile rows at a time keeps the
// MB sums, the 4 nibble vectors and the MB totals in registers.
template <int MB>
void TileI4(const I4Input* in, const int16_t* const* wide, int64_t K, int64_t G, const uint8_t* t,
            const uint16_t* s, float* y, int64_t ldy) {
  const int64_t groups = K / G;
  const __m256i low4 = _mm256_set1_epi16(0x000F);
  __m256 total[MB][4];
  for (int j = 0; j < 4; ++j) {
    __m256 tot[MB];
    for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
    const uint8_t* tj = t + 32 * j;
    for (int64_t g = 0; g < groups; ++g) {
      __m256i acc[MB];
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_si256();
      for (int64_t k = g * G; k < (g + 1) * G; k += 32, tj += 128) {
        if (j == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(tj + kPrefetchBytes), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(tj + kPrefetchBytes + 64), _MM_HINT_T0);
        }
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tj));
        const __m256i n0 = _mm256_and_si256(v, low4), n1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        const __m256i n2 = _mm256_and_si256(_mm256_srli_epi16(v, 8), low4), n3 = _mm256_srli_epi16(v, 12);
        for (int m = 0; m < MB; ++m) {
          const __m256i* xw = reinterpret_cast<const __m256i*>(wide[m] + 2 * k);
          __m256i a = _mm256_madd_epi16(n0, _mm256_loadu_si256(xw));
          a = _mm256_add_epi32(a, _mm256_madd_epi16(n1, _mm256_loadu_si256(xw + 1)));
          a = _mm256_add_epi32(a, _mm256_madd_epi16(n2, _mm256_loadu_si256(xw + 2)));
          a = _mm256_add_epi32(a, _mm256_madd_epi16(n3, _mm256_loadu_si256(xw + 3)));
          acc[m] = _mm256_add_epi32(acc[m], a);
        }
      }
      const float s0 = Bf16(s[2 * j * groups + g]), s1 = Bf16(s[(2 * j + 1) * groups + g]);
      for (int m = 0; m < MB; ++m) {
        const float xs = in[m].scale[g];
        const __m256 sv = _mm256_set_m128(_mm_set1_ps(s1 * xs), _mm_set1_ps(s0 * xs));
        tot[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[m], _mm256_set1_epi32(in[m].sum2[g]))), sv,
                                 tot[m]);
      }
    }
    for (int m = 0; m < MB; ++m) total[m][j] = tot[m];
  }
  for (int m = 0; m < MB; ++m) _mm256_storeu_ps(y + m * ldy, PairSums(total[m]));
}

ffi::Error Invalid(const char* kernel, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string(kernel) + ": " + what);
}

// x [..., K] -> its M rows (0 when K = 0); checks that x's last dimension is the weights' K.
ffi::Error RowsOfX(const char* kernel, const ffi::Buffer<ffi::F32>& x, int64_t K, int64_t* M) {
  if (x.dimensions().size() < 1 || x.dimensions().back() != K)
    return Invalid(kernel, "x's last dimension must equal the weights' K = " + std::to_string(K));
  *M = K ? x.element_count() / K : 0;
  return ffi::Error::Success();
}

// x [..., K] -> (M, K); checks the tiling constraints of the quantized layouts.
ffi::Error Dims(const char* kernel, const ffi::Buffer<ffi::F32>& x, int64_t K, int64_t N, int64_t* M) {
  if (K % 32 != 0 || N % kTileRows != 0)
    return Invalid(kernel, "K must be a multiple of 32 and N of 8, got K=" + std::to_string(K) + " N=" + std::to_string(N));
  return RowsOfX(kernel, x, K, M);
}

// One quantized weight [N, K] of a GEMV call, its scales and its result y [M, N].
struct QuantWeight {
  const void* q;
  const void* scale;
  float* y;
  int64_t N, K, groups;  // groups: scale columns (int4), 1 for int8
  int64_t y_elements;
};

// The (weights, scale) pairs after x, with one result each: checked and collected, all with the same K
// (and, for int4, the same number of groups). cols: the weight columns in one tile of a row (int8: 8,
// int4: 32, two per byte).
template <ffi::DataType QT, ffi::DataType ST>
ffi::Error Weights(const char* kernel, int64_t cols, const ffi::RemainingArgs& args, const ffi::RemainingRets& rets,
                   std::vector<QuantWeight>* out) {
  if (rets.size() == 0 || args.size() != 2 * rets.size())
    return Invalid(kernel, "expected x, then (weights, scale) pairs and one result per pair; got " +
                               std::to_string(args.size()) + " operands after x for " + std::to_string(rets.size()) +
                               " results");
  for (size_t i = 0; i < rets.size(); ++i) {
    const std::string which = "weight " + std::to_string(i) + ": ";
    auto q = args.get<ffi::Buffer<QT>>(2 * i);
    auto scale = args.get<ffi::Buffer<ST>>(2 * i + 1);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (q.has_error() || scale.has_error() || y.has_error())
      return Invalid(kernel, which + "wrong element type of the weights, the scale or the result");
    auto qd = q->dimensions();
    if (qd.size() != 4) return Invalid(kernel, which + "the packed weights must be 4-D tiles [N/8, K/cols, 8, bytes]");
    const int64_t N = qd[0] * kTileRows, K = qd[1] * cols;
    auto sd = scale->dimensions();
    if (sd.size() != (ST == ffi::DataType::BF16 ? 2u : 1u))
      return Invalid(kernel, which + (ST == ffi::DataType::BF16 ? "scale must be [N, K/G]" : "scale must be [N]"));
    if (sd[0] != N) return Invalid(kernel, which + "scale must have N = " + std::to_string(N) + " rows");
    const int64_t groups = sd.size() == 2 ? sd[1] : 1;
    if (!out->empty() && (K != out->front().K || groups != out->front().groups))
      return Invalid(kernel, which + "every weight of one call must have the same K and scale groups as weight 0");
    out->push_back({q->untyped_data(), scale->untyped_data(), (*y)->typed_data(), N, K, groups, (*y)->element_count()});
  }
  return ffi::Error::Success();
}

// Dims for x and every weight of the call (M: x's rows), and each result's size M x N.
ffi::Error WeightDims(const char* kernel, const ffi::Buffer<ffi::F32>& x, const std::vector<QuantWeight>& ws,
                      int64_t* M) {
  for (size_t i = 0; i < ws.size(); ++i) {
    if (auto e = Dims(kernel, x, ws[i].K, ws[i].N, M); e.failure()) return e;
    if (ws[i].y_elements != *M * ws[i].N)
      return Invalid(kernel, "result " + std::to_string(i) + " must have M x N = " + std::to_string(*M) + " x " +
                                 std::to_string(ws[i].N) + " elements");
  }
  return ffi::Error::Success();
}

// Runs rows(w, r0, r1) for all rows of every weight, split into ForRowBlocks' blocks over the weights'
// rows taken together: one call's small weights (q, k, v of an attention layer) keep both threads
// streaming, and the call pays the pool's start and finish once.
template <typename F>
void ForWeightRows(ffi::ThreadPool& pool, const std::vector<QuantWeight>& ws, const F& rows) {
  int64_t total = 0;
  for (const QuantWeight& w : ws) total += w.N;
  ForRowBlocks(pool, total, [&](int64_t r0, int64_t r1) {
    int64_t offset = 0;
    for (const QuantWeight& w : ws) {
      const int64_t a = std::max(r0, offset), b = std::min(r1, offset + w.N);
      if (a < b) rows(w, a - offset, b - offset);
      offset += w.N;
    }
  });
}

// y_i = x @ W_i^T for int8 weights W_i [N_i, K] (x [..., K] read once for all of them).
ffi::Error GemvI8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  std::vector<QuantWeight> ws;
  if (auto e = Weights<ffi::S8, ffi::F32>("TinyvlmGemvI8", 8, args, rets, &ws); e.failure()) return e;
  int64_t M;
  if (auto e = WeightDims("TinyvlmGemvI8", x, ws, &M); e.failure()) return e;
  const int64_t K = ws.front().K;
  const float* xp = x.typed_data();
  ForWeightRows(pool, ws, [&](const QuantWeight& w, int64_t r0, int64_t r1) {
    const int8_t* q = static_cast<const int8_t*>(w.q);
    const float* scale = static_cast<const float*>(w.scale);
    const int64_t N = w.N;
    if (M == 1) return RowsI8(xp, K, q, scale, w.y, r0, r1);
    for (int64_t r = r0; r < r1; r += kTileRows) {  // each tile from memory once, for every row of x
      const int8_t* t = q + r * K;
      const float* sc = scale + r;
      float* y = w.y + r;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) TileI8<4>(xp + m * K, K, t, sc, y + m * N, N);
      switch (M - m) {
        case 3: TileI8<3>(xp + m * K, K, t, sc, y + m * N, N); break;
        case 2: TileI8<2>(xp + m * K, K, t, sc, y + m * N, N); break;
        case 1: TileI8<1>(xp + m * K, K, t, sc, y + m * N, N); break;
      }
    }
  });
  return ffi::Error::Success();
}

// y_i = x @ W_i^T for int4 weights W_i [N_i, K] with one group size (x prepared once for all of them).
ffi::Error GemvI4(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  std::vector<QuantWeight> ws;
  if (auto e = Weights<ffi::U8, ffi::BF16>("TinyvlmGemvI4", 32, args, rets, &ws); e.failure()) return e;
  int64_t M;
  if (auto e = WeightDims("TinyvlmGemvI4", x, ws, &M); e.failure()) return e;
  const int64_t K = ws.front().K, groups = ws.front().groups;
  if (groups < 1 || K % groups != 0 || (K / groups) % 32 != 0)
    return Invalid("TinyvlmGemvI4", "scale must be [N, K/G] with the group size G a multiple of 32");
  const int64_t G = K / groups;
  if (G > 16384)  // RowsI4's int32 sums of a group would overflow
    return Invalid("TinyvlmGemvI4", "the group size must be at most 16384, got " + std::to_string(G));
  const float* xp = x.typed_data();
  std::unique_ptr<int16_t[]> q16(new int16_t[M * K]);
  std::unique_ptr<float[]> xscale(new float[M * groups]);
  std::unique_ptr<int32_t[]> sum2(new int32_t[M * groups]);
  auto input = [&](int64_t m) { return I4Input{q16.get() + m * K, xscale.get() + m * groups, sum2.get() + m * groups}; };
  for (int64_t m = 0; m < M; ++m) PrepareI4Input(xp + m * K, K, G, input(m));
  // Several rows of x (TileI4): their inputs widened, and pointers to each row's.
  const int64_t tiled = M > 1 ? M : 0;
  std::unique_ptr<int16_t[]> wide(new int16_t[tiled * 2 * K]);
  std::unique_ptr<I4Input[]> ins(new I4Input[tiled]);
  std::unique_ptr<const int16_t*[]> wides(new const int16_t*[tiled]);
  for (int64_t m = 0; m < tiled; ++m) {
    WidenI4Input(q16.get() + m * K, K, wide.get() + m * 2 * K);
    ins[m] = input(m);
    wides[m] = wide.get() + m * 2 * K;
  }
  ForWeightRows(pool, ws, [&](const QuantWeight& w, int64_t r0, int64_t r1) {
    const uint8_t* p = static_cast<const uint8_t*>(w.q);
    const uint16_t* scale = static_cast<const uint16_t*>(w.scale);
    const int64_t N = w.N;
    if (M == 1) return RowsI4(input(0), K, G, p, scale, w.y, r0, r1);
    for (int64_t r = r0; r < r1; r += kTileRows) {  // each tile from memory once, for every row of x
      const uint8_t* t = p + r * (K / 2);
      const uint16_t* s = scale + r * groups;
      float* y = w.y + r;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) TileI4<4>(ins.get() + m, wides.get() + m, K, G, t, s, y + m * N, N);
      switch (M - m) {
        case 3: TileI4<3>(ins.get() + m, wides.get() + m, K, G, t, s, y + m * N, N); break;
        case 2: TileI4<2>(ins.get() + m, wides.get() + m, K, G, t, s, y + m * N, N); break;
        case 1: TileI4<1>(ins.get() + m, wides.get() + m, K, G, t, s, y + m * N, N); break;
      }
    }
  });
  return ffi::Error::Success();
}

// y[m, :n] += sum_{k0 <= k < k1} x[m, k] w[k, :n] for m < M (x [M, K]; rows of w and y ldw and ldy
// floats apart; n % 8 == 0), four rows of w at a time: with n = ldw, rows k0..k1 of w are one
// contiguous stretch of memory, read once in order (for M > 1 the other rows of x find the four rows
// in L2).
void AxpyRowsF32(const float* x, int64_t M, int64_t K, const float* w, int64_t ldw, int64_t n, int64_t k0,
                 int64_t k1, float* y, int64_t ldy) {
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const float *w0 = w + k * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K + k;
      const __m256 x0 = _mm256_set1_ps(xm[0]), x1 = _mm256_set1_ps(xm[1]);
      const __m256 x2 = _mm256_set1_ps(xm[2]), x3 = _mm256_set1_ps(xm[3]);
      float* ym = y + m * ldy;
      int64_t j = 0;
      for (; j + 16 <= n; j += 16) {
        __m256 a = _mm256_loadu_ps(ym + j), b = _mm256_loadu_ps(ym + j + 8);
        a = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w0 + j), a);
        b = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w0 + j + 8), b);
        a = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w1 + j), a);
        b = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w1 + j + 8), b);
        a = _mm256_fmadd_ps(x2, _mm256_loadu_ps(w2 + j), a);
        b = _mm256_fmadd_ps(x2, _mm256_loadu_ps(w2 + j + 8), b);
        a = _mm256_fmadd_ps(x3, _mm256_loadu_ps(w3 + j), a);
        b = _mm256_fmadd_ps(x3, _mm256_loadu_ps(w3 + j + 8), b);
        _mm256_storeu_ps(ym + j, a);
        _mm256_storeu_ps(ym + j + 8, b);
      }
      for (; j < n; j += 8) {
        __m256 a = _mm256_loadu_ps(ym + j);
        a = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w0 + j), a);
        a = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w1 + j), a);
        a = _mm256_fmadd_ps(x2, _mm256_loadu_ps(w2 + j), a);
        a = _mm256_fmadd_ps(x3, _mm256_loadu_ps(w3 + j), a);
        _mm256_storeu_ps(ym + j, a);
      }
    }
  }
  for (; k < k1; ++k)
    for (int64_t m = 0; m < M; ++m) {
      const __m256 xv = _mm256_set1_ps(x[m * K + k]);
      for (int64_t j = 0; j < n; j += 8)
        _mm256_storeu_ps(y + m * ldy + j,
                         _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + k * ldw + j), _mm256_loadu_ps(y + m * ldy + j)));
    }
}

// y [M, N] = x [M, K] @ w [K, N] in float32, w as a Flax Dense kernel holds it (inputs major), for a
// few rows of x (see the top of this file), in max(8, 2 x threads) tasks. Up to kAxpyMaxSplitN
// outputs, each task takes a contiguous run of rows of w and adds their products into its own
// partial sums [M, N], which are then added in task order (the same result whichever thread took
// which task). Wider layers (an untied LM head) would make those sums as large as the weights' rows
// themselves, so each task takes a block of columns instead and writes its outputs directly.
constexpr int64_t kAxpyTasks = 8;
constexpr int64_t kAxpyMaxSplitN = 16384;

ffi::Error GemvF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (wd.size() != 2) return Invalid("TinyvlmGemvF32", "w must be [K, N]");
  const int64_t K = wd[0], N = wd[1];
  int64_t M;
  if (auto e = RowsOfX("TinyvlmGemvF32", x, K, &M); e.failure()) return e;
  if (N % 8 != 0) return Invalid("TinyvlmGemvF32", "N must be a multiple of 8, got " + std::to_string(N));
  const int64_t split = std::max<int64_t>(kAxpyTasks, 2 * pool.num_threads());
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* yp = y->typed_data();
  std::fill(yp, yp + y->element_count(), 0.f);  // all of y: with K = 0, M cannot be read off x
  if (M == 0 || K == 0 || N == 0) return ffi::Error::Success();
  if (N > kAxpyMaxSplitN) {
    const int64_t cols = (N + 16 * split - 1) / (16 * split) * 16;  // whole cache lines of y per task
    ParallelFor(pool, (N + cols - 1) / cols, [&](int64_t t) {
      const int64_t n0 = t * cols;
      AxpyRowsF32(xp, M, K, wp + n0, N, std::min(N, n0 + cols) - n0, 0, K, yp + n0, N);
    });
    return ffi::Error::Success();
  }
  const int64_t per = (K + 4 * split - 1) / (4 * split) * 4;  // rows of w per task, a multiple of 4
  const int64_t tasks = (K + per - 1) / per;
  std::unique_ptr<float[]> parts(new float[tasks * M * N]);
  ParallelFor(pool, tasks, [&](int64_t t) {
    float* part = parts.get() + t * M * N;
    std::fill(part, part + M * N, 0.f);
    AxpyRowsF32(xp, M, K, wp, N, N, t * per, std::min(K, (t + 1) * per), part, N);
  });
  for (int64_t t = 0; t < tasks; ++t) {
    const float* part = parts.get() + t * M * N;
    for (int64_t j = 0; j < M * N; j += 8)
      _mm256_storeu_ps(yp + j, _mm256_add_ps(_mm256_loadu_ps(yp + j), _mm256_loadu_ps(part + j)));
  }
  return ffi::Error::Success();
}

constexpr int64_t kF32TRows = 16, kF32TDepth = 256;  // RowsF32T's rows of x and columns per pass

// acc[m * 8 + i] += lanes of x[m, k0..k1) * w[i, k0..k1) for MB rows of x and RB rows of w (both K
// floats apart): each lane of a sum takes the columns k = lane (mod 8), in order, so a sum gets the
// same bits whatever MB, RB and the split of k are. pf, if set: the rows to prefetch into L2 meanwhile.
template <int MB, int RB>
inline void DotBlock(const float* x, int64_t K, const float* w, int64_t k0, int64_t k1, __m256* acc, const float* pf) {
  __m256 a[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < RB; ++i) a[m][i] = acc[m * 8 + i];
  for (int64_t k = k0; k < k1; k += 8) {
    if (pf != nullptr && k % 16 == 0)
      for (int i = 0; i < RB; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * K + k), _MM_HINT_T1);
    for (int i = 0; i < RB; ++i) {
      const __m256 wv = _mm256_loadu_ps(w + i * K + k);
      for (int m = 0; m < MB; ++m) a[m][i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), a[m][i]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < RB; ++i) acc[m * 8 + i] = a[m][i];
}

// DotBlock over the 8 rows of a tile (t: its first row), RB rows at a time.
template <int MB, int RB>
void TileDots(const float* x, int64_t K, const float* t, int64_t k0, int64_t k1, __m256* acc, const float* pf) {
  for (int j = 0; j < 8; j += RB) DotBlock<MB, RB>(x, K, t + j * K, k0, k1, acc + j, pf ? pf + j * K : nullptr);
}

// y[m, r0..r1) for all M rows of x and rows r0..r1 of w [N, K] (a multiple of 8): per tile of 8 rows
// of w, up to kF32TRows rows of x at a time, kF32TDepth columns at a time (so that the tile's and
// x's columns stay in L1 while every row of x uses them), 4 rows of x x 2 rows of w per register
// block. The first rows of x prefetch the next tile into L2 as they read this one: without that,
// a batch-8 head took 55-61 ms against 44-54 (2 threads, 151,936 x 896, in a C++ timing loop).
void RowsF32T(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N, int64_t r0, int64_t r1) {
  __m256 acc[kF32TRows * 8];
  for (int64_t r = r0; r < r1; r += kTileRows) {
    const float* t = w + r * K;
    const float* next = r + kTileRows < r1 ? t + kTileRows * K : nullptr;
    for (int64_t m0 = 0; m0 < M; m0 += kF32TRows) {
      const int64_t mb = std::min(kF32TRows, M - m0);
      const float* xb = x + m0 * K;
      std::fill(acc, acc + mb * 8, _mm256_setzero_ps());
      for (int64_t k0 = 0; k0 < K; k0 += kF32TDepth) {
        const int64_t k1 = std::min(K, k0 + kF32TDepth);
        int64_t m = 0;
        for (; m + 4 <= mb; m += 4) TileDots<4, 2>(xb + m * K, K, t, k0, k1, acc + m * 8, m0 + m == 0 ? next : nullptr);
        const float* pf = m0 + m == 0 ? next : nullptr;
        switch (mb - m) {
          case 3: TileDots<3, 2>(xb + m * K, K, t, k0, k1, acc + m * 8, pf); break;
          case 2: TileDots<2, 4>(xb + m * K, K, t, k0, k1, acc + m * 8, pf); break;
          case 1: TileDots<1, 8>(xb + m * K, K, t, k0, k1, acc + m * 8, pf); break;
        }
      }
      for (int64_t m = 0; m < mb; ++m) _mm256_storeu_ps(y + (m0 + m) * N + r, ReduceRows(acc + m * 8));
    }
  }
}

// y [M, N] = x [M, K] @ w.T for w [N, K] (a tied LM head in a batched decode step: see the top of
// this file). Each row of y gets the same bits as this kernel gives that row alone.
ffi::Error GemvF32T(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (wd.size() != 2) return Invalid("TinyvlmGemvF32T", "w must be [N, K]");
  const int64_t N = wd[0], K = wd[1];
  int64_t M;
  if (auto e = RowsOfX("TinyvlmGemvF32T", x, K, &M); e.failure()) return e;
  if (N % kTileRows != 0 || K % 8 != 0)
    return Invalid("TinyvlmGemvF32T", "N and K must be multiples of 8, got N=" + std::to_string(N) +
                                          " K=" + std::to_string(K));
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* yp = y->typed_data();
  if (K == 0) {
    std::fill(yp, yp + y->element_count(), 0.f);
    return ffi::Error::Success();
  }
  ForRowBlocks(pool, N, [&](int64_t r0, int64_t r1) { RowsF32T(xp, M, K, wp, yp, N, r0, r1); });
  return ffi::Error::Success();
}

// The dequantizing kernels' first operand (`after`, any buffer, not read) is the input that the
// weights will multiply: it orders the call after that input is computed. Without it, XLA ran all
// of a program's dequantizations first (they depend on parameters alone), so every float32 weight
// was alive at once: a full-size int4 prefill held 1.44 GB of temp buffers (float32: 0.05 GB), the
// image encoder 0.53 GB, and faulted those pages in afresh at every call.
ffi::Error DequantI8(ffi::ThreadPool pool, ffi::AnyBuffer after, ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> scale,
                     ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions();
  int64_t N = qd[0] * 8, K = qd[1] * 8;
  const int8_t* qp = q.typed_data();
  const float* sp = scale.typed_data();
  float* op = out->typed_data();
  ForRowBlocks(pool, N, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r += kTileRows) {
      const int8_t* t = qp + r * K;
      for (int64_t k = 0; k < K; k += 8, t += 64)
        for (int j = 0; j < 8; ++j)
          _mm256_storeu_ps(op + (r + j) * K + k, _mm256_mul_ps(LoadI8(t + 8 * j), _mm256_set1_ps(sp[r + j])));
    }
  });
  return ffi::Error::Success();
}

ffi::Error DequantI4(ffi::ThreadPool pool, ffi::AnyBuffer after, ffi::Buffer<ffi::U8> p, ffi::Buffer<ffi::BF16> scale,
                     ffi::ResultBuffer<ffi::F32> out) {
  auto pd = p.dimensions();
  int64_t N = pd[0] * 8, K = pd[1] * 32, groups = scale.dimensions()[1], G = K / groups;
  const uint8_t* pp = p.typed_data();
  const uint16_t* sp = scale.typed_data();
  float* op = out->typed_data();
  ForRowBlocks(pool, N, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r += kTileRows) {
      const uint8_t* t = pp + r * (K / 2);
      for (int64_t k = 0; k < K; k += 32, t += 128)
        for (int j = 0; j < 8; ++j) {
          __m256 w[4];
          UnpackI4(t + 16 * j, w);
          __m256 s = _mm256_set1_ps(Bf16(sp[(r + j) * groups + k / G]));
          __m256 eight = _mm256_set1_ps(8.f);
          for (int c = 0; c < 4; ++c)
            _mm256_storeu_ps(op + (r + j) * K + k + 8 * c, _mm256_mul_ps(_mm256_sub_ps(w[c], eight), s));
        }
    }
  });
  return ffi::Error::Success();
}

// x (float32) -> bfloat16, rounded to the nearest even as XLA's convert rounds (a NaN stays a NaN).
// `after` (any buffer, not read) orders the call after that operand exists, as for DequantI8: a
// prefill with bfloat16 matmuls converts each float32 weight once its input exists, where XLA's own
// converts, which depend on parameters alone, all ran first (0.74 GB of bfloat16 weights alive at
// once in a full-size prefill).
ffi::Error ToBf16(ffi::ThreadPool pool, ffi::AnyBuffer after, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::BF16> out) {
  const int64_t n = x.element_count();
  const uint32_t* in = reinterpret_cast<const uint32_t*>(x.typed_data());
  uint16_t* o = reinterpret_cast<uint16_t*>(out->typed_data());
  constexpr int64_t kChunk = 1 << 16;
  ParallelFor(pool, (n + kChunk - 1) / kChunk, [&](int64_t c) {
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) {
      const uint32_t v = in[i];
      o[i] = (v & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>((v >> 16) | 0x40u)
                                             : static_cast<uint16_t>((v + 0x7FFFu + ((v >> 16) & 1u)) >> 16);
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------
// One-query attention of a decode step (grouped-query attention over a KV cache).

// exp(x) for 8 floats (Cephes' polynomial as in avx_mathfun, relative error about 1e-7); x <= 0 here.
inline __m256 Exp(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  __m256 fx = _mm256_round_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)),
                              _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float Sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

constexpr int64_t kSlotChunk = 128;  // cache slots per decode task: K and V of all heads, 128 KB, stay in L2
constexpr int64_t kSlotsAhead = 8;   // the key pass prefetches the cache rows this many slots ahead

// acc[g, c0 .. c0 + 8 NC) += sum_{j < ns} p[j * 8 + g] * v[j * row + c0 ..] for the G queries: NC
// accumulator vectors in registers (a compile-time count, so that they are not spilled).
template <int NC>
inline void AccumulateValues(const float* p, const float* v, int64_t row, int64_t ns, int64_t G, int64_t hd,
                             int64_t c0, float* acc) {
  for (int64_t g = 0; g < G; ++g) {
    __m256 r[NC];
    for (int i = 0; i < NC; ++i) r[i] = _mm256_loadu_ps(acc + g * hd + c0 + 8 * i);
    for (int64_t j = 0; j < ns; ++j) {
      const float w = p[j * 8 + g];
      if (w == 0.f) continue;
      const __m256 wv = _mm256_set1_ps(w);
      for (int i = 0; i < NC; ++i) r[i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + j * row + c0 + 8 * i), r[i]);
    }
    for (int i = 0; i < NC; ++i) _mm256_storeu_ps(acc + g * hd + c0 + 8 * i, r[i]);
  }
}

// The dot products of GN <= 8 queries q [GN, hd] with one key row, in lanes 0..GN-1 (the rest 0).
// GN is a template argument so that the GN accumulators stay in registers.
template <int GN>
inline __m256 KeyDots(const float* q, const float* key, int64_t hd) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < hd; c += 8) {
    const __m256 kv = _mm256_loadu_ps(key + c);
    for (int j = 0; j < GN; ++j) a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * hd + c), kv, a[j]);
  }
  return ReduceRows(a);
}

inline __m256 KeyDotsN(int64_t gn, const float* q, const float* key, int64_t hd) {
  switch (gn) {
    case 8: return KeyDots<8>(q, key, hd);
    case 7: return KeyDots<7>(q, key, hd);
    case 6: return KeyDots<6>(q, key, hd);
    case 5: return KeyDots<5>(q, key, hd);
    case 4: return KeyDots<4>(q, key, hd);
    case 3: return KeyDots<3>(q, key, hd);
    case 2: return KeyDots<2>(q, key, hd);
    default: return KeyDots<1>(q, key, hd);
  }
}

// Partial attention of one row's queries q [KV, G, hd] over the n cache slots of one chunk (slot s:
// key row kb + s * row, whose head h starts at h * hd; values in vb likewise) where mask[s]. Per
// unit u = (KV head h, group of up to 8 queries g0 / 8), parts + u * part gets the maximum m[8] of
// each query's scaled logits, the sum l[8] of exp(logit - m) and acc [8, hd] = the sum of
// exp(logit - m) * value (not normalised); with no visible slot, m = -inf, l = 0 and acc = 0.
// Probabilities are kept as p [units, n, 8] (slot-major, one lane per query), so a key row is read
// once for a group's queries, and the softmax's max, exp and sum run on one vector per slot.
// Each pass visits a slot once for every head (key pass: every unit's dots, prefetching the key
// rows kSlotsAhead slots ahead; value pass: 8 slots at a time, prefetching the next 8 value rows),
// so that the cache streams in from memory while all the heads compute. (The kernel before ran all
// passes of one head before the next head's, so the cache streamed in only during the first head's
// passes, and the memory sat idle during the others: figures at the top of this file. In a C++
// timing loop, chunks of 128 slots were faster than 64 for 8 rows, and 256 no faster than 128.)
void AttendChunk(const float* q, const float* kb, const float* vb, const bool* mask, int64_t row, int64_t n,
                 int64_t KV, int64_t G, int64_t hd, float scale, float* p, float* parts, int64_t part) {
  auto prefetch_row = [row](const float* r) {
    for (int64_t i = 0; i < row; i += 16) _mm_prefetch(reinterpret_cast<const char*>(r + i), _MM_HINT_T0);
  };
  const int64_t groups = (G + 7) / 8, units = KV * groups;
  const __m256 vscale = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-INFINITY);
  for (int64_t u = 0; u < units; ++u) _mm256_storeu_ps(parts + u * part, ninf);  // m: the running maximum
  for (int64_t s = 0; s < n; ++s) {
    if (s + kSlotsAhead < n) prefetch_row(kb + (s + kSlotsAhead) * row);
    for (int64_t h = 0; h < KV; ++h)
      for (int64_t g0 = 0; g0 < G; g0 += 8) {
        const int64_t u = h * groups + g0 / 8;
        float* ps = p + (u * n + s) * 8;
        if (!mask[s]) {
          _mm256_storeu_ps(ps, ninf);
          continue;
        }
        const __m256 logit = _mm256_mul_ps(KeyDotsN(std::min<int64_t>(8, G - g0), q + (h * G + g0) * hd,
                                                    kb + s * row + h * hd, hd), vscale);
        _mm256_storeu_ps(ps, logit);
        _mm256_storeu_ps(parts + u * part, _mm256_max_ps(_mm256_loadu_ps(parts + u * part), logit));
      }
  }
  for (int64_t u = 0; u < units; ++u) {
    float *pu = p + u * n * 8, *pt = parts + u * part;
    const __m256 vmax = _mm256_loadu_ps(pt);
    // Lanes with no visible slot subtract 0 instead of -inf (their probabilities are cleared anyway).
    const __m256 shift = _mm256_blendv_ps(vmax, _mm256_setzero_ps(), _mm256_cmp_ps(vmax, ninf, _CMP_EQ_OQ));
    __m256 total = _mm256_setzero_ps();
    for (int64_t s = 0; s < n; ++s) {  // masked slots: exp(-inf - max) is cleared to exactly 0
      const __m256 x = _mm256_loadu_ps(pu + s * 8);
      const __m256 e = _mm256_and_ps(Exp(_mm256_sub_ps(x, shift)), _mm256_cmp_ps(x, ninf, _CMP_GT_OQ));
      _mm256_storeu_ps(pu + s * 8, e);
      total = _mm256_add_ps(total, e);
    }
    _mm256_storeu_ps(pt + 8, total);
    std::fill(pt + 16, pt + part, 0.f);
  }
  for (int64_t s = 0; s < n; s += 8) {
    const int64_t ns = std::min<int64_t>(8, n - s);
    for (int64_t t = s + 8; t < std::min(n, s + 16); ++t) prefetch_row(vb + t * row);
    for (int64_t h = 0; h < KV; ++h)
      for (int64_t g0 = 0; g0 < G; g0 += 8) {
        const int64_t u = h * groups + g0 / 8, gn = std::min<int64_t>(8, G - g0);
        const float *ps = p + (u * n + s) * 8, *v = vb + s * row + h * hd;
        float* acc = parts + u * part + 16;
        for (int64_t c0 = 0; c0 < hd; c0 += 64) {  // up to 64 columns in registers
          switch (std::min<int64_t>(8, (hd - c0) / 8)) {
            case 8: AccumulateValues<8>(ps, v, row, ns, gn, hd, c0, acc); break;
            case 7: AccumulateValues<7>(ps, v, row, ns, gn, hd, c0, acc); break;
            case 6: AccumulateValues<6>(ps, v, row, ns, gn, hd, c0, acc); break;
            case 5: AccumulateValues<5>(ps, v, row, ns, gn, hd, c0, acc); break;
            case 4: AccumulateValues<4>(ps, v, row, ns, gn, hd, c0, acc); break;
            case 3: AccumulateValues<3>(ps, v, row, ns, gn, hd, c0, acc); break;
            case 2: AccumulateValues<2>(ps, v, row, ns, gn, hd, c0, acc); break;
            default: AccumulateValues<1>(ps, v, row, ns, gn, hd, c0, acc); break;
          }
        }
      }
  }
}

// q [B, KV, G, hd] attends to k_new, v_new [B, KV, hd] (its own slot) and to the cache slots s of
// k_cache, v_cache [B, S, KV, hd] where mask [B, S] is true -> out [B, KV, G, hd], in float32 like
// XLA's softmax (max subtracted, then normalised). One task per (row, chunk of 128 slots) covers
// every KV head: the cache is read once, in order (a task per KV head read every slot's row, whose
// heads share cache lines, once per head). The chunks' partial sums are then combined
// (flash-decoding) with the query's own slot.
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                           ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::F32> k_cache,
                           ffi::Buffer<ffi::F32> v_cache, ffi::Buffer<ffi::PRED> mask, float scale,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), cd = k_cache.dimensions();
  if (qd.size() != 4 || cd.size() != 4 || mask.dimensions().size() != 2)
    return Invalid("TinyvlmDecodeAttention", "expected q [B, KV, G, hd], caches [B, S, KV, hd] and mask [B, S]");
  const int64_t B = qd[0], KV = qd[1], G = qd[2], hd = qd[3], S = cd[1];
  if (cd[0] != B || cd[2] != KV || cd[3] != hd || hd % 8 != 0 || mask.dimensions()[1] != S ||
      v_cache.element_count() != k_cache.element_count() || k_new.element_count() != B * KV * hd ||
      v_new.element_count() != B * KV * hd)
    return Invalid("TinyvlmDecodeAttention", "shapes disagree (or head_dim is not a multiple of 8)");
  const float *qp = q.typed_data(), *knp = k_new.typed_data(), *vnp = v_new.typed_data();
  const float *kc = k_cache.typed_data(), *vc = v_cache.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  const int64_t row = KV * hd;  // floats per cache slot
  const int64_t chunks = std::max<int64_t>(1, (S + kSlotChunk - 1) / kSlotChunk), groups = (G + 7) / 8;
  // Partial results per (row, chunk, KV head, group of 8 queries): m[8], l[8], acc [8, hd].
  const int64_t part = 16 + 8 * hd, parts_per_row = chunks * KV * groups;
  std::unique_ptr<float[]> parts(new float[B * parts_per_row * part]);
  ParallelFor(pool, B * chunks, [&](int64_t task) {
    const int64_t b = task / chunks, c = task % chunks, s0 = c * kSlotChunk, n = std::max<int64_t>(0, std::min(S, s0 + kSlotChunk) - s0);
    std::unique_ptr<float[]> p(new float[std::max<int64_t>(n, 1) * KV * groups * 8]);
    AttendChunk(qp + b * KV * G * hd, kc + (b * S + s0) * row, vc + (b * S + s0) * row, mp + b * S + s0, row, n, KV, G,
                hd, scale, p.get(), parts.get() + task * KV * groups * part, part);
  });
  // Combine: the query's own slot (logit own, weight 1, value v_new) and each chunk's partial sums.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < KV; ++h) {
      const float *kn = knp + (b * KV + h) * hd, *vn = vnp + (b * KV + h) * hd;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qp + ((b * KV + h) * G + g) * hd;
        float own = 0.f;
        for (int64_t c = 0; c < hd; ++c) own += qg[c] * kn[c];
        own *= scale;
        float mx = own;
        auto at = [&](int64_t c) { return parts.get() + ((b * chunks + c) * KV * groups + h * groups + g / 8) * part; };
        for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, at(c)[g % 8]);
        const float w_own = std::exp(own - mx);
        float total = w_own;
        float* o = op + ((b * KV + h) * G + g) * hd;
        for (int64_t j = 0; j < hd; ++j) o[j] = w_own * vn[j];
        for (int64_t c = 0; c < chunks; ++c) {
          const float* pt = at(c);
          if (pt[8 + g % 8] == 0.f) continue;  // no visible slot in this chunk
          const float w = std::exp(pt[g % 8] - mx);
          total += w * pt[8 + g % 8];
          const float* acc = pt + 16 + (g % 8) * hd;
          for (int64_t j = 0; j < hd; ++j) o[j] += w * acc[j];
        }
        const float inv = 1.f / total;
        for (int64_t j = 0; j < hd; ++j) o[j] *= inv;
      }
    }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------
// Bidirectional multi-head attention of the vision tower (no mask).

constexpr int64_t kQueryBlock = 48;  // queries whose scores [48, P] stay in L2 at a time

constexpr int64_t kDepthBlock = 128;  // Gemm16's depth per pass: a [128, 16] panel of B stays in L1

#if defined(__AVX512F__)
// c[i * ldc + 0..15] (+)= sum_d a[i * lda + d] * b[d * ldb + 0..15] for MR <= kTileMR rows: a register
// tile of one 16-float vector per row (12 accumulators; named so that GCC keeps them in registers),
// added to c's values when `accumulate`. Each output adds its products in the order of d, as the
// AVX2 tile below does, so both give the same bits; this one does twice the work per instruction.
// On a 2-core Zen 5 VM (one thread, a C++ timing loop), one view's 12 heads x 12 blocks of 48 queries
// took 4.8 ms against the AVX2 tile's 8.0 (212 against 127 GFLOP/s), the same bits; the full-size
// time to first token went from 3.18 to 3.03 s, and with bfloat16 matmuls from 2.03 to 1.87 s
// (medians of 8 generations each, the two builds in turn).
constexpr int kTileMR = 12;

template <int MR>
inline void Tile16(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc,
                   bool accumulate) {
  __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  __m512 c6 = c0, c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  if (accumulate) {
#define TINYVLM_LOAD(i, r) \
    if (MR > i) r = _mm512_loadu_ps(c + i * ldc);
    TINYVLM_LOAD(0, c0) TINYVLM_LOAD(1, c1) TINYVLM_LOAD(2, c2) TINYVLM_LOAD(3, c3) TINYVLM_LOAD(4, c4)
    TINYVLM_LOAD(5, c5) TINYVLM_LOAD(6, c6) TINYVLM_LOAD(7, c7) TINYVLM_LOAD(8, c8) TINYVLM_LOAD(9, c9)
    TINYVLM_LOAD(10, c10) TINYVLM_LOAD(11, c11)
#undef TINYVLM_LOAD
  }
  for (int64_t d = 0; d < depth; ++d) {
    const __m512 b0 = _mm512_loadu_ps(b + d * ldb);
#define TINYVLM_ROW(i, r) \
    if (MR > i) r = _mm512_fmadd_ps(_mm512_set1_ps(a[i * lda + d]), b0, r);
    TINYVLM_ROW(0, c0) TINYVLM_ROW(1, c1) TINYVLM_ROW(2, c2) TINYVLM_ROW(3, c3) TINYVLM_ROW(4, c4)
    TINYVLM_ROW(5, c5) TINYVLM_ROW(6, c6) TINYVLM_ROW(7, c7) TINYVLM_ROW(8, c8) TINYVLM_ROW(9, c9)
    TINYVLM_ROW(10, c10) TINYVLM_ROW(11, c11)
#undef TINYVLM_ROW
  }
  const __m512 out[12] = {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11};
  for (int i = 0; i < MR; ++i) _mm512_storeu_ps(c + i * ldc, out[i]);
}
#else
constexpr int kTileMR = 6;

template <int MR>
inline void Tile16(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc,
                   bool accumulate) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  if (accumulate) {
#define TINYVLM_LOAD(i, r0, r1)                                                              \
    if (MR > i) {                                                                            \
      r0 = _mm256_loadu_ps(c + i * ldc);                                                     \
      r1 = _mm256_loadu_ps(c + i * ldc + 8);                                                 \
    }
    TINYVLM_LOAD(0, c00, c01) TINYVLM_LOAD(1, c10, c11) TINYVLM_LOAD(2, c20, c21)
    TINYVLM_LOAD(3, c30, c31) TINYVLM_LOAD(4, c40, c41) TINYVLM_LOAD(5, c50, c51)
#undef TINYVLM_LOAD
  }
  for (int64_t d = 0; d < depth; ++d) {
    const __m256 b0 = _mm256_loadu_ps(b + d * ldb), b1 = _mm256_loadu_ps(b + d * ldb + 8);
    __m256 ai;
#define TINYVLM_ROW(i, r0, r1)                         \
    if (MR > i) {                                      \
      ai = _mm256_broadcast_ss(a + i * lda + d);       \
      r0 = _mm256_fmadd_ps(ai, b0, r0);                \
      r1 = _mm256_fmadd_ps(ai, b1, r1);                \
    }
    TINYVLM_ROW(0, c00, c01) TINYVLM_ROW(1, c10, c11) TINYVLM_ROW(2, c20, c21)
    TINYVLM_ROW(3, c30, c31) TINYVLM_ROW(4, c40, c41) TINYVLM_ROW(5, c50, c51)
#undef TINYVLM_ROW
  }
  const __m256 out[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 2; ++j) _mm256_storeu_ps(c + i * ldc + 8 * j, out[i][j]);
}

#endif

// Tile16<m> for a run-time m in 1..MR.
template <int MR>
inline void TileRows(int m, const float* a, int64_t lda, const float* b, int64_t depth, float* c, int64_t ldc,
                     bool accumulate) {
  if (m == MR) return Tile16<MR>(a, lda, b, 16, depth, c, ldc, accumulate);
  if constexpr (MR > 1) TileRows<MR - 1>(m, a, lda, b, depth, c, ldc, accumulate);
}

// C [rows, n] = A [rows, depth] @ B [depth, n] (n % 16 == 0), in kTileMR x 16 tiles. B is packed in panels of
// 16 columns: B[d, col] = b[(col / 16) * panel + d * 16 + col % 16]. Each panel is used in depth
// blocks of kDepthBlock rows by every row tile in turn, so that it is read from L1; with B's rows
// apart and the tiles in row-major order, they ran at 30-38 GFLOP/s per core, against 76 from L1.
void Gemm16(const float* a, int64_t lda, const float* b, int64_t panel, int64_t depth, float* c, int64_t ldc,
            int64_t rows, int64_t n) {
  for (int64_t col = 0; col < n; col += 16)
    for (int64_t d0 = 0; d0 < depth; d0 += kDepthBlock) {
      const int64_t dn = std::min(kDepthBlock, depth - d0);
      const float* bp = b + col / 16 * panel + d0 * 16;
      for (int64_t r = 0; r < rows; r += kTileMR)
        TileRows<kTileMR>(static_cast<int>(std::min<int64_t>(kTileMR, rows - r)), a + r * lda + d0, lda, bp, dn,
                          c + r * ldc + col, ldc, d0 > 0);
    }
}

// Copies rows a + i * lda (i < rows, hd floats each) to the contiguous [rows, hd] buffer out: one head's
// queries sit a whole token apart, and rows that far apart share L1 sets (48 of them, 3 KB apart,
// kept the score tiles at half speed).
inline void PackRows(const float* a, int64_t lda, int64_t rows, int64_t hd, float* out) {
  for (int64_t i = 0; i < rows; ++i) std::copy(a + i * lda, a + i * lda + hd, out + i * hd);
}

// Packs one head's keys (times scale) and values, rows kb + s * row and vb + s * row for s < n, as
// Gemm16's B operands, zero past n (n' = n rounded up to 16): kt [n'/16][hd][16] (K^T) and
// vp [hd/16][n'][16] (V).
void PackKeysValues(const float* kb, const float* vb, int64_t row, int64_t n, int64_t np, int64_t hd, float scale,
                    float* kt, float* vp) {
  for (int64_t s = 0; s < np; ++s)
    for (int64_t c = 0; c < hd; ++c) {
      kt[(s / 16) * hd * 16 + c * 16 + s % 16] = s < n ? kb[s * row + c] * scale : 0.f;
      vp[(c / 16) * np * 16 + s * 16 + c % 16] = s < n ? vb[s * row + c] : 0.f;
    }
}

// exp(s - max s) in place over one row of n scores (n % 8 == 0, at least one finite; -inf entries
// become exactly 0); returns 1 / the row's sum.
inline float SoftmaxRow(float* s, int64_t n) {
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  __m256 vmax = ninf;
  for (int64_t j = 0; j < n; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  const __m256 vm = _mm256_set1_ps(*std::max_element(lanes, lanes + 8));
  __m256 total = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 l = _mm256_loadu_ps(s + j);
    const __m256 e = _mm256_and_ps(Exp(_mm256_sub_ps(l, vm)), _mm256_cmp_ps(l, ninf, _CMP_GT_OQ));
    _mm256_storeu_ps(s + j, e);
    total = _mm256_add_ps(total, e);
  }
  return 1.f / Sum8(total);
}

// q, k, v, out [N, P, H, hd] (hd % 16 == 0): out = softmax(q k^T * scale) v per view and head, in
// float32 with the row maximum subtracted. One task per (view, head): its keys and values are packed
// once (PackKeysValues, P' = P rounded up to 16), then blocks of queries go scores -> softmax -> values.
ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, float scale, ffi::ResultBuffer<ffi::F32> out) {
  auto d = q.dimensions();
  if (d.size() != 4 || d[3] % 16 != 0 || k.element_count() != q.element_count() ||
      v.element_count() != q.element_count())
    return Invalid("TinyvlmAttention", "expected q, k, v [N, P, H, hd] of one shape with hd a multiple of 16");
  const int64_t N = d[0], P = d[1], H = d[2], hd = d[3], row = H * hd, Pp = (P + 15) / 16 * 16;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, N * H, [&](int64_t task) {
    const int64_t n = task / H, h = task % H, base = n * P * row + h * hd;
    std::unique_ptr<float[]> kt(new float[hd * Pp]), sc(new float[kQueryBlock * Pp]);
    std::unique_ptr<float[]> vpad(new float[Pp * hd]), qbuf(new float[kQueryBlock * hd]);  // values: rows P.. zero
    PackKeysValues(kp + base, vp + base, row, P, Pp, hd, scale, kt.get(), vpad.get());
    for (int64_t q0 = 0; q0 < P; q0 += kQueryBlock) {
      const int64_t rows = std::min(kQueryBlock, P - q0);
      PackRows(qp + base + q0 * row, row, rows, hd, qbuf.get());
      Gemm16(qbuf.get(), hd, kt.get(), hd * 16, hd, sc.get(), Pp, rows, Pp);  // scaled scores
      float inv[kQueryBlock];  // 1 / each row's sum, applied to its output row
      for (int64_t i = 0; i < rows; ++i) {  // the padding columns P.. get probability 0
        std::fill(sc.get() + i * Pp + P, sc.get() + (i + 1) * Pp, -INFINITY);
        inv[i] = SoftmaxRow(sc.get() + i * Pp, Pp);
      }
      float* o = op + base + q0 * row;
      Gemm16(sc.get(), Pp, vpad.get(), Pp * 16, Pp, o, row, rows, hd);  // exp(scores) @ values
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t c = 0; c < hd; c += 8)
          _mm256_storeu_ps(o + i * row + c, _mm256_mul_ps(_mm256_loadu_ps(o + i * row + c), _mm256_set1_ps(inv[i])));
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------
// Masked grouped-query attention of a prompt chunk against the KV cache (prefill).

// Softmax of one row of scores s[0, n) in place, where allowed[j] (or j >= limit: always masked):
// masked entries become exactly 0. Returns 1 / the row's sum, or 0 when no entry is visible
// (the row is then all 0).
inline float MaskedSoftmaxRow(float* s, const bool* allowed, int64_t n, int64_t limit) {
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  int any = 0;
  int64_t j = 0;
  for (; j + 8 <= std::min(n, limit); j += 8) {  // 8 mask bytes -> 8 lanes
    int64_t bytes;
    std::memcpy(&bytes, allowed + j, 8);
    const __m256 visible = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
        _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes)), _mm256_setzero_si256()));
    _mm256_storeu_ps(s + j, _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + j), visible));
    any |= _mm256_movemask_ps(visible);
  }
  for (; j < n; ++j) {
    const bool visible = j < limit && allowed[j];
    if (!visible) s[j] = -INFINITY;
    any |= visible;
  }
  if (!any) {
    std::fill(s, s + n, 0.f);
    return 0.f;
  }
  return SoftmaxRow(s, n);
}

// q, out [B, L, KV, G, hd]; k, v [B, K, KV, hd]; mask [B, L, K] (hd % 16 == 0): query t of row b
// attends to the keys s where mask[b, t, s], in float32 with the row maximum subtracted. A query
// that sees no key gets the mean of all K values, as XLA's formulation with its -1e30 bias does.
// One task per (row, query head): its keys and values are packed once (PackKeysValues), then
// blocks of 48 queries go scores -> softmax -> values over only the key columns that some query
// of the block sees (for a causal prompt, the keys up to the block's last query), so the masked
// half of the causal scores and the cache's empty slots cost nothing.
ffi::Error ChunkAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, float scale,
                          ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  if (qd.size() != 5 || kd.size() != 4 || md.size() != 3)
    return Invalid("TinyvlmChunkAttention", "expected q [B, L, KV, G, hd], k, v [B, K, KV, hd] and mask [B, L, K]");
  const int64_t B = qd[0], L = qd[1], KV = qd[2], G = qd[3], hd = qd[4], K = kd[1];
  if (kd[0] != B || kd[2] != KV || kd[3] != hd || hd % 16 != 0 || v.element_count() != k.element_count() ||
      md[0] != B || md[1] != L || md[2] != K)
    return Invalid("TinyvlmChunkAttention", "shapes disagree (or head_dim is not a multiple of 16)");
  const int64_t qrow = KV * G * hd, krow = KV * hd, Kp = (K + 15) / 16 * 16;
  const int64_t blocks = (L + kQueryBlock - 1) / kQueryBlock;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  // Per (row, query block): the key columns [lo, hi) that some query of the block sees, rounded
  // out to multiples of 16 (lo == hi when none does).
  std::unique_ptr<int64_t[]> lo(new int64_t[B * blocks]), hi(new int64_t[B * blocks]);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      int64_t first = K, last = -1;
      for (int64_t t = blk * kQueryBlock; t < std::min(L, (blk + 1) * kQueryBlock); ++t) {
        const char* m = reinterpret_cast<const char*>(mp + (b * L + t) * K);  // bools: bytes 0 / 1
        const char* f = static_cast<const char*>(std::memchr(m, 1, K));
        if (f == nullptr) continue;
        first = std::min<int64_t>(first, f - m);
        last = std::max<int64_t>(last, static_cast<const char*>(memrchr(m, 1, K)) - m);
      }
      lo[b * blocks + blk] = last < 0 ? 0 : first / 16 * 16;
      hi[b * blocks + blk] = last < 0 ? 0 : (last + 16) / 16 * 16;
    }
  ParallelFor(pool, B * KV * G, [&](int64_t task) {
    const int64_t b = task / (KV * G), h = task % (KV * G), kvh = h / G;
    const float *kb = kp + b * K * krow + kvh * hd, *vb = vp + b * K * krow + kvh * hd;
    std::unique_ptr<float[]> kt(new float[hd * Kp]), sc(new float[kQueryBlock * Kp]), vpad(new float[Kp * hd]);
    std::unique_ptr<float[]> qbuf(new float[kQueryBlock * hd]);
    PackKeysValues(kb, vb, krow, K, Kp, hd, scale, kt.get(), vpad.get());
    std::unique_ptr<float[]> vmean;  // the mean of all values, for queries that see no key
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t q0 = blk * kQueryBlock, rows = std::min(kQueryBlock, L - q0);
      const int64_t c0 = lo[b * blocks + blk], width = hi[b * blocks + blk] - c0;
      const float* qb = qp + (b * L + q0) * qrow + h * hd;
      float* ob = op + (b * L + q0) * qrow + h * hd;
      float inv[kQueryBlock];
      if (width > 0) {
        PackRows(qb, qrow, rows, hd, qbuf.get());
        Gemm16(qbuf.get(), hd, kt.get() + c0 * hd, hd * 16, hd, sc.get(), Kp, rows, width);  // scaled scores
        for (int64_t i = 0; i < rows; ++i)
          inv[i] = MaskedSoftmaxRow(sc.get() + i * Kp, mp + (b * L + q0 + i) * K + c0, width, K - c0);
        Gemm16(sc.get(), Kp, vpad.get() + c0 * 16, Kp * 16, width, ob, qrow, rows, hd);  // exp(scores) @ values
      } else {
        std::fill(inv, inv + rows, 0.f);
      }
      for (int64_t i = 0; i < rows; ++i) {
        float* o = ob + i * qrow;
        if (inv[i] == 0.f) {
          if (!vmean) {
            vmean.reset(new float[hd]());
            for (int64_t s = 0; s < K; ++s)
              for (int64_t c = 0; c < hd; ++c) vmean[c] += vpad[(c / 16) * Kp * 16 + s * 16 + c % 16];
            for (int64_t c = 0; c < hd; ++c) vmean[c] /= K;
          }
          std::copy(vmean.get(), vmean.get() + hd, o);
          continue;
        }
        for (int64_t c = 0; c < hd; c += 8)
          _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(o + c), _mm256_set1_ps(inv[i])));
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TinyvlmGemvI8, GemvI8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TinyvlmGemvI4, GemvI4,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TinyvlmGemvF32, GemvF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TinyvlmGemvF32T, GemvF32T,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TinyvlmDequantI8, DequantI8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TinyvlmDequantI4, DequantI4,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TinyvlmToBf16, ToBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TinyvlmDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TinyvlmAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TinyvlmChunkAttention, ChunkAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
