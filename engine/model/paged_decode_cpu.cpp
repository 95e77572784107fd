// Fused paged-attention decode for CPU: one query token per request, keys and values read
// straight from the cache blocks (no gather copy), fp32 accumulation, two-pass softmax.
// Built on first use by engine/model/paged_decode_cpu.py (torch.utils.cpp_extension.load).
//
// q [B, H, D] (bf16 or f32), kv_cache [2, NB, BS, KVH, D] (same dtype), block_tables [B, MB]
// int64, context_lens [B] int64 -> out [B, H, D] (dtype of q). One task per (request, kv head);
// each task computes the scores of all G = H / KVH query heads of its group in one pass over
// the keys. The loops are written for auto-vectorization (16 independent fp32 lanes, no
// reassociation needed), so no intrinsics and no -ffast-math.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxD = 256;
constexpr int kMaxG = 16;
constexpr int kLanes = 16;

inline void store_row(const float* src, float* dst, int d) {
  std::memcpy(dst, src, sizeof(float) * d);
}

inline void store_row(const float* src, at::BFloat16* dst, int d) {
  for (int i = 0; i < d; ++i) dst[i] = c10::BFloat16(src[i]);  // round to nearest even
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// exp(x) for x <= 0 (max-subtracted scores): Cephes-style range reduction + degree-5 polynomial.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, fx);  // y * 2^fx
}

// The AVX-512 task: D = 16 * NV, the group's accumulators stay in L1 as __m512.
template <typename T, int NV>
void task_avx512(const T* q, const T* kc, const T* vc, const int64_t* table, int64_t n, int64_t BS,
                 int64_t row, int64_t G, float scale, T* out, std::vector<float>& scores) {
  __m512 qv[kMaxG][NV];
  __m512 acc[kMaxG][NV];
  for (int64_t g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) {
      qv[g][v] = _mm512_mul_ps(load16(q + g * NV * 16 + v * 16), _mm512_set1_ps(scale));
      acc[g][v] = _mm512_setzero_ps();
    }
  const int64_t np = (n + 15) / 16 * 16;
  scores.resize(static_cast<size_t>(G * std::max<int64_t>(np, 16)));
  float* sc = scores.data();  // [G][np]
  for (int64_t t = 0; t < n; ++t) {
    const T* k = kc + (table[t / BS] * BS + t % BS) * row;
    __m512 kv[NV];
    for (int v = 0; v < NV; ++v) kv[v] = load16(k + v * 16);
    for (int64_t g = 0; g < G; ++g) {
      __m512 s = _mm512_mul_ps(qv[g][0], kv[0]);
      for (int v = 1; v < NV; ++v) s = _mm512_fmadd_ps(qv[g][v], kv[v], s);
      sc[g * np + t] = _mm512_reduce_add_ps(s);
    }
  }
  float inv_sum[kMaxG];
  for (int64_t g = 0; g < G; ++g) {
    float* s = sc + g * np;
    for (int64_t t = n; t < np; ++t) s[t] = -INFINITY;
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < np; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + t));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < np; t += 16) {
      __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), mx));
      if (t + 16 > n) e = _mm512_maskz_mov_ps((__mmask16)((1u << (n - t)) - 1u), e);
      _mm512_storeu_ps(s + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    const float total = _mm512_reduce_add_ps(sum);
    inv_sum[g] = total > 0.f ? 1.f / total : 0.f;
  }
  for (int64_t t = 0; t < n; ++t) {
    const T* vp = vc + (table[t / BS] * BS + t % BS) * row;
    __m512 vv[NV];
    for (int v = 0; v < NV; ++v) vv[v] = load16(vp + v * 16);
    for (int64_t g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(sc[g * np + t]);
      for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_fmadd_ps(p, vv[v], acc[g][v]);
    }
  }
  alignas(64) float o[NV * 16];
  for (int64_t g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(inv_sum[g]);
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(o + v * 16, _mm512_mul_ps(acc[g][v], inv));
    store_row(o, out + g * NV * 16, NV * 16);
  }
}
#endif

inline void load_row(const float* src, float* dst, int d) {
  std::memcpy(dst, src, sizeof(float) * d);
}

inline void load_row(const at::BFloat16* src, float* dst, int d) {
  // bf16 -> fp32 is a 16-bit shift; memcpy through a uint32 buffer keeps strict aliasing.
  alignas(64) uint16_t s[kMaxD];
  alignas(64) uint32_t o[kMaxD];
  std::memcpy(s, src, sizeof(uint16_t) * d);
  for (int i = 0; i < d; ++i) o[i] = static_cast<uint32_t>(s[i]) << 16;
  std::memcpy(dst, o, sizeof(uint32_t) * d);
}


// dot(a, b) over d elements (d a multiple of kLanes, zero-padded by the caller).
inline float dot(const float* __restrict a, const float* __restrict b, int d) {
  float acc[kLanes] = {0};
  for (int i = 0; i < d; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

template <typename T>
void decode_kernel(const T* q, const T* kv, const int64_t* tables, const int64_t* ctx_lens,
                   T* out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t NB, int64_t BS,
                   int64_t MB, float scale) {
  const int64_t G = H / KVH;
  const int64_t Dp = (D + kLanes - 1) / kLanes * kLanes;  // padded row length
  const int64_t row = KVH * D;                            // elements per cache slot
  const T* kc = kv;
  const T* vc = kv + NB * BS * row;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float qf[kMaxG][kMaxD];
    alignas(64) float acc[kMaxG][kMaxD];
    alignas(64) float kf[kMaxD];
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, h = task % KVH;
      const int64_t n = std::min(std::max<int64_t>(ctx_lens[b], 0), MB * BS);
      const int64_t* table = tables + b * MB;
#if defined(__AVX512F__)
      {
        const T* qb = q + (b * H + h * G) * D;
        T* ob = out + (b * H + h * G) * D;
        const T* kh = kc + h * D;
        const T* vh = vc + h * D;
        bool done = true;
        switch (D) {
          case 32: task_avx512<T, 2>(qb, kh, vh, table, n, BS, row, G, scale, ob, scores); break;
          case 64: task_avx512<T, 4>(qb, kh, vh, table, n, BS, row, G, scale, ob, scores); break;
          case 80: task_avx512<T, 5>(qb, kh, vh, table, n, BS, row, G, scale, ob, scores); break;
          case 96: task_avx512<T, 6>(qb, kh, vh, table, n, BS, row, G, scale, ob, scores); break;
          case 128: task_avx512<T, 8>(qb, kh, vh, table, n, BS, row, G, scale, ob, scores); break;
          default: done = false;
        }
        if (done) continue;
      }
#endif
      for (int64_t g = 0; g < G; ++g) {
        std::fill(qf[g], qf[g] + Dp, 0.f);
        load_row(q + (b * H + h * G + g) * D, qf[g], (int)D);
        for (int64_t i = 0; i < D; ++i) qf[g][i] *= scale;
        std::fill(acc[g], acc[g] + Dp, 0.f);
      }
      std::fill(kf, kf + Dp, 0.f);
      scores.resize(static_cast<size_t>(G * std::max<int64_t>(n, 1)));
      float* sc = scores.data();  // [G][n]
      // Pass 1: scores of every query head of the group, one pass over the keys.
      for (int64_t t = 0; t < n; ++t) {
        const int64_t slot = table[t / BS] * BS + t % BS;
        load_row(kc + slot * row + h * D, kf, (int)D);
        for (int64_t g = 0; g < G; ++g) sc[g * n + t] = dot(qf[g], kf, (int)Dp);
      }
      // Softmax per head (max-subtracted; the sum is folded into the final scaling).
      float inv_sum[kMaxG];
      for (int64_t g = 0; g < G; ++g) {
        float* s = sc + g * n;
        float m = -INFINITY;
        for (int64_t t = 0; t < n; ++t) m = std::max(m, s[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) {
          s[t] = std::exp(s[t] - m);
          sum += s[t];
        }
        inv_sum[g] = sum > 0.f ? 1.f / sum : 0.f;
      }
      // Pass 2: weighted sum of the values.
      for (int64_t t = 0; t < n; ++t) {
        const int64_t slot = table[t / BS] * BS + t % BS;
        load_row(vc + slot * row + h * D, kf, (int)D);
        for (int64_t g = 0; g < G; ++g) {
          const float p = sc[g * n + t];
          float* __restrict a = acc[g];
          for (int64_t i = 0; i < Dp; ++i) a[i] += p * kf[i];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t i = 0; i < D; ++i) acc[g][i] *= inv_sum[g];
        store_row(acc[g], out + (b * H + h * G + g) * D, (int)D);
      }
    }
  });
}

}  // namespace

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_tables,
                           torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu(), "paged_decode: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5, "paged_decode: q [B,H,D], kv_cache [2,NB,BS,KVH,D]");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type(), "paged_decode: q and kv_cache dtypes differ");
  q = q.contiguous();
  kv_cache = kv_cache.contiguous();
  block_tables = block_tables.to(torch::kLong).contiguous();
  context_lens = context_lens.to(torch::kLong).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = kv_cache.size(1), BS = kv_cache.size(2), KVH = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(0) == 2 && kv_cache.size(4) == D, "paged_decode: kv_cache shape");
  TORCH_CHECK(D <= kMaxD, "paged_decode: head_dim > ", kMaxD);
  TORCH_CHECK(KVH > 0 && H % KVH == 0 && H / KVH <= kMaxG, "paged_decode: bad head grouping");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && context_lens.numel() == B,
              "paged_decode: block_tables [B, MB], context_lens [B]");
  const int64_t MB = block_tables.size(1);
  auto out = torch::empty_like(q);
  if (B == 0) return out;
  if (q.scalar_type() == torch::kFloat) {
    decode_kernel<float>(q.data_ptr<float>(), kv_cache.data_ptr<float>(),
                         block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),
                         out.data_ptr<float>(), B, H, KVH, D, NB, BS, MB, (float)scale);
  } else if (q.scalar_type() == torch::kBFloat16) {
    decode_kernel<at::BFloat16>(q.data_ptr<at::BFloat16>(), kv_cache.data_ptr<at::BFloat16>(),
                                block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),
                                out.data_ptr<at::BFloat16>(), B, H, KVH, D, NB, BS, MB, (float)scale);
  } else {
    TORCH_CHECK(false, "paged_decode: dtype must be float32 or bfloat16");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernel touches no Python object: the GIL is released while it runs, so the worker's
  // asyncio thread (heartbeats, Pongs, token sends) is not held up by every decode step's attention.
  m.def("paged_decode", &paged_decode, "fused paged-attention decode (CPU)",
        py::call_guard<py::gil_scoped_release>());
}
