/* The ceilings of this machine, for docs/performance.md: the peak of 128-bit fused
   multiply-adds on one core (10 independent chains); the register-blocked kernel that the
   Cranelift tier generates for the scores of attention (4 rows by 2 vectors of 4 floats, a
   64-long reduction, operands in L1) written with intrinsics and compiled by GCC; and the rate
   at which one core reads memory (a 1 GiB array of floats summed in 256-bit vectors), and the
   scores of decode (S[m] = sum_e q[e] K[e, m], K[E = 128, M = 16384] per head, 16 heads) in the
   order the Cranelift tier runs them (32 keys at a time, the head dimension inside) and with
   the head dimension outside (each row of K read along a tile, the scores kept in cache); and
   decode in PyTorch's layout (`benches/pytorch.ein` decode, K and V [M = 16384, E = 128] per
   head, 16 heads) in the loops of Cranelift's kernel: the scores four keys at a time with the
   head dimension in lanes, then the probabilities times the values, four vectors of values side
   by side, in tiles of 128 keys (a constant scale stands for the softmax).

   gcc -O2 -mavx2 -mfma -o /tmp/ceiling benches/ceiling.c && /tmp/ceiling
   (run two at once to see both cores: `/tmp/ceiling & /tmp/ceiling; wait`) */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static double fma_peak(void) {
  __m128 a[10];
  for (int i = 0; i < 10; i++) a[i] = _mm_set1_ps(i * 0.001f);
  const __m128 x = _mm_set1_ps(0.9999f), y = _mm_set1_ps(0.00001f);
  const long n = 20000000;
  double best = 1e9;
  for (int rep = 0; rep < 7; rep++) {
    double t0 = now();
    for (long i = 0; i < n; i++) {
#pragma GCC unroll 10
      for (int k = 0; k < 10; k++) a[k] = _mm_fmadd_ps(a[k], x, y);
    }
    double t = now() - t0;
    if (t < best) best = t;
  }
  float sink = 0;
  for (int i = 0; i < 10; i++) sink += a[i][0];
  if (sink == 12345.0f) puts("");
  return n * 10.0 * 8.0 / best / 1e9;
}

static double block_kernel(void) {
  const int E = 64, M = 256, P = 256, H = 8;
  float *Q = aligned_alloc(64, 4 * E * P), *K = aligned_alloc(64, 4 * E * M), *S = aligned_alloc(64, 4 * M * P);
  for (int i = 0; i < E * P; i++) Q[i] = i * 1e-4f;
  for (int i = 0; i < E * M; i++) K[i] = i * 1e-4f;
  double best = 1e9;
  for (int rep = 0; rep < 50; rep++) {
    double t0 = now();
    for (int h = 0; h < H; h++)
      for (int m = 0; m < M; m += 4)
        for (int p = 0; p < P; p += 8) {
          __m128 a0 = _mm_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
          for (int e = 0; e < E; e++) {
            __m128 q0 = _mm_loadu_ps(Q + e * P + p), q1 = _mm_loadu_ps(Q + e * P + p + 4);
            __m128 k0 = _mm_broadcast_ss(K + e * M + m), k1 = _mm_broadcast_ss(K + e * M + m + 1);
            __m128 k2 = _mm_broadcast_ss(K + e * M + m + 2), k3 = _mm_broadcast_ss(K + e * M + m + 3);
            a0 = _mm_fmadd_ps(k0, q0, a0), a1 = _mm_fmadd_ps(k1, q0, a1);
            a2 = _mm_fmadd_ps(k2, q0, a2), a3 = _mm_fmadd_ps(k3, q0, a3);
            b0 = _mm_fmadd_ps(k0, q1, b0), b1 = _mm_fmadd_ps(k1, q1, b1);
            b2 = _mm_fmadd_ps(k2, q1, b2), b3 = _mm_fmadd_ps(k3, q1, b3);
          }
          float *s = S + m * P + p;
          _mm_storeu_ps(s, a0), _mm_storeu_ps(s + P, a1), _mm_storeu_ps(s + 2 * P, a2), _mm_storeu_ps(s + 3 * P, a3);
          _mm_storeu_ps(s + 4, b0), _mm_storeu_ps(s + P + 4, b1), _mm_storeu_ps(s + 2 * P + 4, b2);
          _mm_storeu_ps(s + 3 * P + 4, b3);
        }
    double t = now() - t0;
    if (t < best) best = t;
  }
  if (S[77] == 12345.0f) puts("");
  free(Q), free(K), free(S);
  return (double)H * 2 * E * M * P / best / 1e9;
}

static double read_bandwidth(void) {
  const size_t n = (size_t)1 << 28;
  float *x = aligned_alloc(64, n * sizeof(float));
  for (size_t i = 0; i < n; i++) x[i] = (float)(i & 1023);
  double best = 1e9;
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (int rep = 0; rep < 5; rep++) {
    double t0 = now();
    for (size_t i = 0; i < n; i += 32) {
      s0 = _mm256_add_ps(s0, _mm256_load_ps(x + i)), s1 = _mm256_add_ps(s1, _mm256_load_ps(x + i + 8));
      s2 = _mm256_add_ps(s2, _mm256_load_ps(x + i + 16)), s3 = _mm256_add_ps(s3, _mm256_load_ps(x + i + 24));
    }
    double t = now() - t0;
    if (t < best) best = t;
  }
  __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
  if (s[0] == 12345.0f) puts("");
  free(x);
  return n * sizeof(float) / best / 1e9;
}

/* Decode's scores, 16 heads: `rows_outside` 0 reads 32 keys of every row of K in turn, 1 reads
   `tile` keys of one row at a time. Returns GB/s of K read. */
static double decode_scores(int rows_outside, long tile) {
  const long H = 16, E = 128, M = 16384;
  float *K = aligned_alloc(64, 4 * H * E * M), *q = aligned_alloc(64, 4 * H * E), *S = aligned_alloc(64, 4 * M);
  for (long i = 0; i < H * E * M; i++) K[i] = (i & 255) * 1e-3f;
  for (long i = 0; i < H * E; i++) q[i] = 1e-3f * i;
  double best = 1e9;
  for (int rep = 0; rep < 5; rep++) {
    double t0 = now();
    for (long h = 0; h < H; h++) {
      const float *kh = K + h * E * M, *qh = q + h * E;
      for (long m1 = 0; m1 < M; m1 += tile) {
        if (!rows_outside) {
          for (long c = 0; c < tile; c += 32) {
            __m128 a[8];
            for (int j = 0; j < 8; j++) a[j] = _mm_setzero_ps();
            for (long e = 0; e < E; e++) {
              __m128 b = _mm_set1_ps(qh[e]);
              const float *k = kh + e * M + m1 + c;
              for (int j = 0; j < 8; j++) a[j] = _mm_fmadd_ps(b, _mm_loadu_ps(k + 4 * j), a[j]);
            }
            for (int j = 0; j < 8; j++) _mm_storeu_ps(S + m1 + c + 4 * j, a[j]);
          }
        } else {
          for (long c = 0; c < tile; c += 4) _mm_storeu_ps(S + m1 + c, _mm_setzero_ps());
          for (long e = 0; e < E; e++) {
            __m128 b = _mm_set1_ps(qh[e]);
            const float *k = kh + e * M + m1;
            for (long c = 0; c < tile; c += 4)
              _mm_storeu_ps(S + m1 + c, _mm_fmadd_ps(b, _mm_loadu_ps(k + c), _mm_loadu_ps(S + m1 + c)));
          }
        }
      }
    }
    double t = now() - t0;
    if (t < best) best = t;
  }
  if (S[5] == 12345.0f) puts("");
  free(K), free(q), free(S);
  return 4.0 * H * E * M / best / 1e9;
}

/* Decode in PyTorch's layout, 16 heads, in the loops of Cranelift's kernel. Returns GB/s of K
   and V read. */
static double decode_loops(void) {
  const long H = 16, E = 128, M = 16384, T = 128;
  float *K = aligned_alloc(64, 4 * H * M * E), *V = aligned_alloc(64, 4 * H * M * E);
  float *q = aligned_alloc(64, 4 * H * E), *o = aligned_alloc(64, 4 * H * E), s[128];
  for (long i = 0; i < H * M * E; i++) K[i] = (i % 97) * 0.01f, V[i] = (i % 89) * 0.01f;
  for (long i = 0; i < H * E; i++) q[i] = (i % 7) * 0.1f;
  double best = 1e9;
  for (int rep = 0; rep < 5; rep++) {
    double t0 = now();
    for (long h = 0; h < H; h++) {
      const float *qh = q + h * E;
      float *oh = o + h * E;
      for (long f = 0; f < E; f++) oh[f] = 0;
      for (long m1 = 0; m1 < M; m1 += T) {
        const float *k = K + (h * M + m1) * E, *v = V + (h * M + m1) * E;
        for (long m = 0; m < T; m += 4) {
          __m128 a0 = _mm_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          for (long e = 0; e < E; e += 4) {
            __m128 b = _mm_loadu_ps(qh + e);
            a0 = _mm_fmadd_ps(b, _mm_loadu_ps(k + m * E + e), a0);
            a1 = _mm_fmadd_ps(b, _mm_loadu_ps(k + (m + 1) * E + e), a1);
            a2 = _mm_fmadd_ps(b, _mm_loadu_ps(k + (m + 2) * E + e), a2);
            a3 = _mm_fmadd_ps(b, _mm_loadu_ps(k + (m + 3) * E + e), a3);
          }
          _mm_storeu_ps(s + m, _mm_hadd_ps(_mm_hadd_ps(a0, a1), _mm_hadd_ps(a2, a3)));
        }
        for (long m = 0; m < T; m++) s[m] *= 1e-3f;
        for (long f = 0; f < E; f += 16) {
          __m128 a[4];
          for (int j = 0; j < 4; j++) a[j] = _mm_loadu_ps(oh + f + 4 * j);
          for (long m = 0; m < T; m++) {
            __m128 p = _mm_set1_ps(s[m]);
            for (int j = 0; j < 4; j++) a[j] = _mm_fmadd_ps(p, _mm_loadu_ps(v + m * E + f + 4 * j), a[j]);
          }
          for (int j = 0; j < 4; j++) _mm_storeu_ps(oh + f + 4 * j, a[j]);
        }
      }
    }
    double t = now() - t0;
    if (t < best) best = t;
  }
  if (o[5] == 12345.0f) puts("");
  free(K), free(V), free(q), free(o);
  return 8.0 * H * M * E / best / 1e9;
}

int main(void) {
  printf("128-bit FMA peak, one core: %.1f GFLOP/s\n", fma_peak());
  printf("4x2 block of the scores (GCC, intrinsics), one core: %.1f GFLOP/s\n", block_kernel());
  printf("memory read, one core: %.1f GB/s\n", read_bandwidth());
  printf("decode scores, one core, 32 keys of every row in turn: %.1f GB/s\n", decode_scores(0, 64));
  printf("decode scores, one core, rows outside, tiles of 1024 keys: %.1f GB/s\n", decode_scores(1, 1024));
  printf("decode scores, one core, rows outside, whole rows: %.1f GB/s\n", decode_scores(1, 16384));
  printf("decode in PyTorch's layout, one core, Cranelift's loops: %.1f GB/s\n", decode_loops());
  return 0;
}
