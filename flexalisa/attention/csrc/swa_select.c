/* SWA's per-step selection and score bookkeeping on the CPU, for flexalisa.attention.native.
 *
 * Each decode step and layer, SWA (ALISA) picks the local window plus the top-scoring older
 * tokens, then adds the step's attention over its selection to the windowed scores. In torch
 * that is a dozen small ops per layer (top-k, compares, cumulative sums, scatters), each paying
 * its dispatch overhead; at SmolLM2's shapes they cost about what attending 80% fewer tokens
 * saves. These functions do the same work in one pass each, with the same results:
 *
 *   flexalisa_select_top   StepBudget.select_top + compact: per row of scores, the local
 *                          slots plus the num_global highest-scoring candidates (ties: the
 *                          lower slot), as ascending slot lists padded with S-1;
 *   flexalisa_window_push  WindowScores.push of one decode row: the selection and its
 *                          head-summed weights written into the ring and scatter-added into
 *                          the float64 totals and the live counts;
 *   flexalisa_window_drop  WindowScores.trim's drop of the oldest row, over a run of layers.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

/* Floyd and Rivest's SELECT (CACM 18(3), 1975): reorders x[left..right] so that x[k] is the
 * value a sort would put there (ascending). Its sampling step narrows the range to a few
 * elements around k before partitioning, about twice as fast as median-of-3 quickselect. */
static void floyd_rivest(double *x, int64_t left, int64_t right, int64_t k) {
  while (right > left) {
    if (right - left > 600) {
      const double n = (double)(right - left + 1), i = (double)(k - left + 1);
      const double z = log(n), s = 0.5 * exp(2.0 * z / 3.0);
      const double sd = 0.5 * sqrt(z * s * (n - s) / n) * (i - n / 2 < 0 ? -1.0 : 1.0);
      int64_t lo = (int64_t)(k - i * s / n + sd), hi = (int64_t)(k + (n - i) * s / n + sd);
      floyd_rivest(x, lo > left ? lo : left, hi < right ? hi : right, k);
    }
    const double t = x[k];
    int64_t i = left, j = right;
    double tmp = x[left]; x[left] = x[k]; x[k] = tmp;
    if (x[right] > t) { tmp = x[right]; x[right] = x[left]; x[left] = tmp; }
    while (i < j) {
      tmp = x[i]; x[i] = x[j]; x[j] = tmp;
      ++i;
      --j;
      while (x[i] < t) ++i;
      while (x[j] > t) --j;
    }
    if (x[left] == t) { tmp = x[left]; x[left] = x[j]; x[j] = tmp; }
    else { ++j; tmp = x[j]; x[j] = x[right]; x[right] = tmp; }
    if (j <= k) left = j + 1;
    if (k <= j) right = j - 1;
  }
}

/* The k-th largest (k from 0) of x[0..n); x is reordered. */
static double kth_largest(double *x, int64_t n, int64_t k) {
  floyd_rivest(x, 0, n - 1, n - 1 - k);
  return x[n - 1 - k];
}

/* scores: R rows of S float64, row r at scores + r * row_stride (unit stride in S). Row r
 * belongs to sequence b = (r / H) % B. local, candidates: (B, S) bytes (disjoint; local =
 * the newest tokens, candidates = the other valid ones), num_global: (B,) int64 with
 * num_global[b] <= the candidates of b. out: (R, width) int64, each row the slots taken in
 * ascending order, then S - 1. Returns 0; -1 where a row takes more than width slots or
 * memory runs out. */
int flexalisa_select_top(const double *scores, int64_t R, int64_t H, int64_t B, int64_t S,
                         int64_t row_stride, const uint8_t *local, const uint8_t *candidates,
                         const int64_t *num_global, int64_t width, int64_t *out, int threads) {
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    double *buf = malloc(sizeof(double) * (S > 0 ? S : 1));
    if (!buf) failed = 1;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      if (!buf) continue;
      const int64_t b = (r / H) % B;
      const double *x = scores + r * row_stride;
      const uint8_t *loc = local + b * S, *cand = candidates + b * S;
      const int64_t g = num_global[b];
      double cut = 0.0;
      int64_t missing = 0;
      if (g > 0) {
        int64_t n = 0;
        for (int64_t s = 0; s < S; ++s)
          if (cand[s]) buf[n++] = x[s];
        if (g > n) { failed = 1; continue; }
        cut = kth_largest(buf, n, g - 1);
        int64_t above = 0;
        for (int64_t i = 0; i < n; ++i) above += buf[i] > cut;
        missing = g - above;  /* the lowest slots among those scoring exactly cut */
      }
      int64_t *row = out + r * width, taken = 0;
      for (int64_t s = 0; s < S; ++s) {
        int take = loc[s];
        if (!take && g > 0 && cand[s]) {
          if (x[s] > cut) take = 1;
          else if (x[s] == cut && missing > 0) { take = 1; --missing; }
        }
        if (take) {
          if (taken == width) { failed = 1; break; }
          row[taken++] = s;
        }
      }
      for (; taken < width; ++taken) row[taken] = S - 1;
    }
    free(buf);
  }
  return failed ? -1 : 0;
}

/* One decode row into a layer's window: for each (b, h < Hsel), entries e < K with
 * entry[b, h, e] set: slot = indices[b, h, e] and weight = weights[b, h, e] (the step's
 * attention summed over the query heads of group h); other entries (e < Kr) hold slot L (the
 * dummy) and weight 0. Both go to ring_slots / ring_weights[b, h, :Kr], and every entry is
 * added to totals[b, h, slot] (as float64) and 1 to live[b, h, slot], as WindowScores.push
 * does. weights: (B, Hsel, K) float32 contiguous. indices, entry: (B, Hsel|1, K) with
 * strides (b, h; 0 where shared) and unit stride in K. ring_*: strides (b, h) and unit stride
 * in Kr. totals (float64), live (int32): strides (b, h), unit stride in slots. Returns 0; -1
 * if an index lies outside [0, L] or K > Kr (nothing is written then). */
int flexalisa_window_push(const float *weights, int64_t B, int64_t Hsel, int64_t K,
                          const int64_t *indices, int64_t idx_b, int64_t idx_h,
                          const uint8_t *entry, int64_t ent_b, int64_t ent_h,
                          int64_t *ring_slots, int64_t rs_b, int64_t rs_h,
                          float *ring_weights, int64_t rw_b, int64_t rw_h, int64_t Kr,
                          double *totals, int64_t t_b, int64_t t_h,
                          int32_t *live, int64_t l_b, int64_t l_h, int64_t L) {
  if (K > Kr) return -1;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hsel; ++h)
      for (int64_t e = 0; e < K; ++e)
        if ((uint64_t)indices[b * idx_b + h * idx_h + e] > (uint64_t)L) return -1;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hsel; ++h) {
      const int64_t *idx = indices + b * idx_b + h * idx_h;
      const uint8_t *ent = entry + b * ent_b + h * ent_h;
      const float *w_in = weights + (b * Hsel + h) * K;
      int64_t *slots = ring_slots + b * rs_b + h * rs_h;
      float *w_out = ring_weights + b * rw_b + h * rw_h;
      double *tot = totals + b * t_b + h * t_h;
      int32_t *lv = live + b * l_b + h * l_h;
      for (int64_t e = 0; e < Kr; ++e) {
        const int real = e < K && ent[e];
        const int64_t slot = real ? idx[e] : L;
        const float w = real ? w_in[e] : 0.f;
        slots[e] = slot;
        w_out[e] = w;
        tot[slot] += (double)w;
        lv[slot] += 1;
      }
    }
  return 0;
}

/* WindowScores.trim's drop of one ring row per sequence, over N layers: for each layer n and
 * sequence b with ring_row[b] >= 0, every entry e < Kr of ring row ring_row[b] of each head
 * h < Hsel is subtracted from totals[n, b, h, slot] (as float64) and 1 from live[n, b, h,
 * slot]; a slot whose live count reaches 0 has its total set to exactly 0 (the residue of
 * add and subtract must not break the tie rule), as the torch path's masked_fill does.
 * Strides are in elements: ring_*: (n, b, row, h) with unit stride in Kr; totals, live:
 * (n, b, h) with unit stride in slots. Returns 0; -1 if a stored slot lies outside [0, L]. */
int flexalisa_window_drop(const int64_t *ring_slots, const float *ring_weights, int64_t N,
                          int64_t B, int64_t Hsel, int64_t Kr, const int64_t *ring_row,
                          int64_t rs_n, int64_t rs_b, int64_t rs_w, int64_t rs_h,
                          int64_t rw_n, int64_t rw_b, int64_t rw_w, int64_t rw_h,
                          double *totals, int64_t t_n, int64_t t_b, int64_t t_h,
                          int32_t *live, int64_t l_n, int64_t l_b, int64_t l_h, int64_t L) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < B; ++b) {
      if (ring_row[b] < 0) continue;
      for (int64_t h = 0; h < Hsel; ++h) {
        const int64_t *slots = ring_slots + n * rs_n + b * rs_b + ring_row[b] * rs_w + h * rs_h;
        for (int64_t e = 0; e < Kr; ++e)
          if ((uint64_t)slots[e] > (uint64_t)L) return -1;
      }
    }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < B; ++b) {
      if (ring_row[b] < 0) continue;
      for (int64_t h = 0; h < Hsel; ++h) {
        const int64_t *slots = ring_slots + n * rs_n + b * rs_b + ring_row[b] * rs_w + h * rs_h;
        const float *weights =
            ring_weights + n * rw_n + b * rw_b + ring_row[b] * rw_w + h * rw_h;
        double *tot = totals + n * t_n + b * t_b + h * t_h;
        int32_t *lv = live + n * l_n + b * l_b + h * l_h;
        for (int64_t e = 0; e < Kr; ++e) {
          const int64_t slot = slots[e];
          tot[slot] -= (double)weights[e];
          if (--lv[slot] == 0) tot[slot] = 0.0;
        }
      }
    }
  return 0;
}
