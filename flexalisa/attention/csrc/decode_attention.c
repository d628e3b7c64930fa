/* One-query (decode) attention for fp32 on the CPU, for flexalisa.attention.native.
 *
 * For each (batch row b, KV head h), the G query heads that share h attend over the S slots
 * given, under the mask of (b, h) (a mask may be shared by the heads, or absent: all slots):
 *
 *     out[b, h, g] = sum_s softmax_s(q[b, h, g] . k[b, h, s] * scale  |  mask[b, h, s]) v[b, h, s]
 *
 * where the S slots are either the first S rows of k and v or, given an index array, the rows it
 * names (a sparse selection attended where it lies, without a gathered copy), optionally with
 * the log-sum-exp of the scaled scores (for merging partial attentions) and the
 * softmax weights themselves (which sparsity methods score tokens by). Each key and value row
 * is read once for all G queries, from its own strides (a view of a larger cache is fine). Work
 * is split over (b, h) with OpenMP, whose runtime is torch's own when loaded into a process that
 * imported torch (same SONAME), so the threads are torch's. Shapes are specialised at compile
 * time for D = 32, 64, 128 and G = 1..8, so that a unit's queries and accumulators stay in
 * vector registers; the caller checks that a call fits.
 *
 * Numerics: fp32 throughout; exp is the Cephes single-precision polynomial (about 1 ulp), and
 * the sums run in another order than torch's kernels, so results differ in the last bits.
 * A row with no valid slot gives zero output and weights and a log-sum-exp of -inf.
 *
 * Written for GCC (vector extensions, __builtin_shuffle); any ISA GCC targets works (AVX2 runs
 * each 16-lane vector as two). Where the build fails (e.g. clang), flexalisa uses torch's ops.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

static inline v16 load16(const float *p) { v16 r; memcpy(&r, p, sizeof r); return r; }
static inline void store16(float *p, v16 r) { memcpy(p, &r, sizeof r); }
static inline v16 splat(float x) { return (v16){0} + x; }

static inline v16 select16(i16 m, v16 a, v16 b) {  /* m ? a : b, lane by lane */
  i16 ai, bi, r;
  memcpy(&ai, &a, sizeof ai);
  memcpy(&bi, &b, sizeof bi);
  r = (m & ai) | (~m & bi);
  v16 out;
  memcpy(&out, &r, sizeof out);
  return out;
}

static inline float hsum16(v16 a) {
  a += __builtin_shuffle(a, (i16){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  a += __builtin_shuffle(a, (i16){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  a += __builtin_shuffle(a, (i16){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  a += __builtin_shuffle(a, (i16){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return a[0];
}

/* exp(x) lane by lane for x <= 0 (Cephes expf); below -87.3 (and -inf) it is 0. */
static inline v16 exp16(v16 x) {
  const v16 lo = splat(-87.33654f);
  const i16 under = x < lo;
  x = select16(under, lo, x);
  const v16 fx = x * 1.44269504088896341f + 0.5f;
  v16 n = __builtin_convertvector(__builtin_convertvector(fx, i16), v16);
  n = select16(n > fx, n - 1.f, n);  /* floor */
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  const v16 z = x * x;
  v16 y = (((((1.9875691500E-4f * x + 1.3981999507E-3f) * x + 8.3334519073E-3f) * x
             + 4.1665795894E-2f) * x + 1.6666665459E-1f) * x + 5.0000001201E-1f) * z + x + 1.f;
  const i16 bits = (__builtin_convertvector(n, i16) + 127) << 23;
  v16 pow2n;
  memcpy(&pow2n, &bits, sizeof pow2n);
  return select16(under, splat(0.f), y * pow2n);
}

/* Rows named by an index array are scattered, which the hardware prefetcher cannot follow:
 * each loop over them asks for the row PREFETCH entries ahead. */
#define PREFETCH 8
static inline void prefetch_row(const float *row, int nv) {
  for (int i = 0; i < nv; ++i) __builtin_prefetch(row + 16 * i);
}

/* One (b, h) unit: G queries of NV * 16 dims; mask: S bytes or NULL (every slot); scores:
 * G * S floats, scratch or the weights' output; lse: G floats or NULL. */
#define DEFINE_UNIT(G, NV)                                                                    \
  static void unit_##G##_##NV(const float *q, const float *k, const float *v,                 \
                              const uint8_t *mask, const int64_t *idx, float *out, int64_t S, \
                              int64_t k_stride, int64_t v_stride, float scale, float *scores, \
                              float *lse, int probs_wanted) {                                 \
    v16 qv[G][NV];                                                                            \
    float mx[G], total[G];                                                                    \
    for (int g = 0; g < G; ++g) {                                                             \
      mx[g] = -INFINITY;                                                                      \
      for (int i = 0; i < NV; ++i) qv[g][i] = load16(q + (g * NV + i) * 16) * scale;          \
    }                                                                                         \
    for (int64_t s = 0; s < S; ++s) {                                                         \
      if (mask && !mask[s]) {                                                                 \
        for (int g = 0; g < G; ++g) scores[g * S + s] = -INFINITY;                            \
        continue;                                                                             \
      }                                                                                       \
      v16 kv[NV];                                                                             \
      if (idx && s + PREFETCH < S) prefetch_row(k + idx[s + PREFETCH] * k_stride, NV);        \
      const float *krow = k + (idx ? idx[s] : s) * k_stride;                                  \
      for (int i = 0; i < NV; ++i) kv[i] = load16(krow + 16 * i);                             \
      for (int g = 0; g < G; ++g) {                                                           \
        v16 acc = qv[g][0] * kv[0];                                                           \
        for (int i = 1; i < NV; ++i) acc += qv[g][i] * kv[i];                                 \
        const float x = hsum16(acc);                                                          \
        scores[g * S + s] = x;                                                                \
        mx[g] = x > mx[g] ? x : mx[g];                                                        \
      }                                                                                       \
    }                                                                                         \
    for (int g = 0; g < G; ++g) {                                                             \
      float *row = scores + g * S, tail = 0.f;                                                \
      if (mx[g] == -INFINITY) { /* no valid slot */                                           \
        memset(row, 0, sizeof(float) * S);                                                    \
        total[g] = 0.f;                                                                       \
        continue;                                                                             \
      }                                                                                       \
      const v16 m = splat(mx[g]);                                                             \
      v16 sum = {0};                                                                          \
      int64_t s = 0;                                                                          \
      for (; s + 16 <= S; s += 16) {                                                          \
        const v16 e = exp16(load16(row + s) - m);                                             \
        store16(row + s, e);                                                                  \
        sum += e;                                                                             \
      }                                                                                       \
      for (; s < S; ++s) {                                                                    \
        row[s] = (!mask || mask[s]) ? expf(row[s] - mx[g]) : 0.f;                             \
        tail += row[s];                                                                       \
      }                                                                                       \
      total[g] = hsum16(sum) + tail;                                                          \
    }                                                                                         \
    v16 acc[G][NV];                                                                           \
    for (int g = 0; g < G; ++g)                                                               \
      for (int i = 0; i < NV; ++i) acc[g][i] = (v16){0};                                      \
    for (int64_t s = 0; s < S; ++s) {                                                         \
      if (mask && !mask[s]) continue;                                                         \
      v16 vv[NV];                                                                             \
      if (idx && s + PREFETCH < S) prefetch_row(v + idx[s + PREFETCH] * v_stride, NV);        \
      const float *vrow = v + (idx ? idx[s] : s) * v_stride;                                  \
      for (int i = 0; i < NV; ++i) vv[i] = load16(vrow + 16 * i);                             \
      for (int g = 0; g < G; ++g) {                                                           \
        const float p = scores[g * S + s];                                                    \
        for (int i = 0; i < NV; ++i) acc[g][i] += p * vv[i];                                  \
      }                                                                                       \
    }                                                                                         \
    for (int g = 0; g < G; ++g) {                                                             \
      const float inv = total[g] > 0.f ? 1.f / total[g] : 0.f;                                \
      for (int i = 0; i < NV; ++i) store16(out + (g * NV + i) * 16, acc[g][i] * inv);         \
      if (lse) lse[g] = total[g] > 0.f ? mx[g] + logf(total[g]) : -INFINITY;                 \
    }                                                                                         \
    if (probs_wanted)                                                                         \
      for (int g = 0; g < G; ++g) {                                                           \
        const float inv = total[g] > 0.f ? 1.f / total[g] : 0.f;                              \
        float *row = scores + g * S;                                                          \
        for (int64_t s = 0; s < S; ++s) row[s] *= inv;                                        \
      }                                                                                       \
  }

#define DEFINE_UNITS(NV)                                                                      \
  DEFINE_UNIT(1, NV) DEFINE_UNIT(2, NV) DEFINE_UNIT(3, NV) DEFINE_UNIT(4, NV)                 \
  DEFINE_UNIT(5, NV) DEFINE_UNIT(6, NV) DEFINE_UNIT(7, NV) DEFINE_UNIT(8, NV)
DEFINE_UNITS(2)
DEFINE_UNITS(4)
DEFINE_UNITS(8)

typedef void (*unit_fn)(const float *, const float *, const float *, const uint8_t *,
                        const int64_t *, float *, int64_t, int64_t, int64_t, float, float *,
                        float *, int);

#define UNIT_ROW(NV)                                                                          \
  {unit_1_##NV, unit_2_##NV, unit_3_##NV, unit_4_##NV,                                        \
   unit_5_##NV, unit_6_##NV, unit_7_##NV, unit_8_##NV}
static const unit_fn UNITS[3][8] = {UNIT_ROW(2), UNIT_ROW(4), UNIT_ROW(8)};

/* The largest G and head dim the specialisations cover; the caller checks against these. */
int flexalisa_max_group(void) { return 8; }
int flexalisa_supports_head_dim(int64_t d) { return d == 32 || d == 64 || d == 128; }

/* q, out: (B, Hkv, G, D) contiguous. k, v: (B, Hkv, N, D) with unit stride in D and the
 * strides given (in floats). idx: NULL, then S = N and slot s of a unit is row s; or
 * (B, Hkv, S) int64 row numbers in [0, N) with strides idx_b, idx_h (0 where the heads share
 * them) and unit stride in S, then slot s of unit (b, h) is row idx[b, h, s] (attention over
 * a selection without gathering it). mask: (B, Hkv, S) bytes with strides mask_b, mask_h (0
 * where the heads share it) and unit stride in S, or NULL. lse: (B, Hkv, G) floats or NULL.
 * probs: (B, Hkv, G, S) floats, the softmax weights, or NULL; then scratch holds
 * threads * G * S floats. Returns 0; -1 for a shape outside the specialisations; -2 if an
 * index lies outside [0, N) (nothing is read then). */
int flexalisa_decode_attention(const float *q, const float *k, const float *v,
                               const uint8_t *mask, float *out, int64_t B, int64_t Hkv,
                               int64_t G, int64_t D, int64_t S, int64_t k_b, int64_t k_h,
                               int64_t k_s, int64_t v_b, int64_t v_h, int64_t v_s,
                               int64_t mask_b, int64_t mask_h, float scale, int threads,
                               float *lse, float *probs, float *scratch, const int64_t *idx,
                               int64_t idx_b, int64_t idx_h, int64_t N) {
  const int row = D == 32 ? 0 : D == 64 ? 1 : D == 128 ? 2 : -1;
  if (row < 0 || G < 1 || G > 8 || threads < 1) return -1;
  if (idx) {
    int bad = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < (idx_h ? Hkv : 1); ++h) {
        const int64_t *r = idx + b * idx_b + h * idx_h;
        for (int64_t s = 0; s < S; ++s) bad |= (uint64_t)r[s] >= (uint64_t)N;
      }
    if (bad) return -2;
  }
  const unit_fn fn = UNITS[row][G - 1];
  const int64_t units = B * Hkv;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t b = u / Hkv, h = u % Hkv;
    float *scores = probs ? probs + u * G * S
                          : scratch + (int64_t)omp_get_thread_num() * G * S;
    fn(q + u * G * D, k + b * k_b + h * k_h, v + b * v_b + h * v_h,
       mask ? mask + b * mask_b + h * mask_h : NULL, idx ? idx + b * idx_b + h * idx_h : NULL,
       out + u * G * D, S, k_s, v_s, scale, scores, lse ? lse + u * G : NULL, probs != NULL);
  }
  return 0;
}
