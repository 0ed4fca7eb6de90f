// Delta-attention kernels (docs/methods.md §2, DeltaLLM): key delta encoding and hybrid attention.
//
// delta_encode: one block per KV head, one thread per channel (blockDim = D rounded up to a warp).
//   Tokens are walked in order (the reference k_hat is a running state): for each token every thread
//   forms d = k - ref for its channel, a block exclusive scan of the keep flags (|d| > theta) gives each
//   kept channel its slot, so the packed values/chan are written in ascending channel order exactly as
//   the composite reference writes them; ref += stored (rounded) value; offsets[start+t+1] = running end.
//   Overflow (the packed buffer is full) stops that head and reports the needed size in overflow[h]
//   (the binding raises, like the reference, without a device sync when overflow is impossible).
// delta_attention: the same two kernels serve decode (T = 1) and chunks (T > 1); nothing calls back
//   into Python.
//   1. delta_scores_kernel  grid (ceil(n/8), Hq, tokens), 8 warps, one warp per key j <= p:
//        inc[j] = q . d_j over the packed deltas of token j (lanes stride the entries: coalesced);
//        ex[j]  = q . k_j (dense) when j is scored exactly (sink / window / this chunk's own keys).
//      Query head qh reads KV head qh / G, so one delta pattern serves the whole GQA group.
//   2. delta_softmax_pv_kernel  grid (Hq, tokens), 512 threads, one block per (token, query head):
//        block prefix scan of inc gives q . k_hat_j (prefix sum over tokens), select exact or delta
//        score, scale, causal (j <= p), softmax in fp32 (block max / sum), then P . V with the threads
//        split as (key group, channel): coalesced rows of v_cache, reduced in shared memory.
//   Scores live in an fp32 workspace [tokens, Hq, n] x 2; the launcher chunks the tokens of a prefill
//   so the workspace stays bounded. Decode at long context would profit from splitting the keys over
//   more blocks (flash-decoding style); this version favours a simple, exact-order implementation.
#include "common.cuh"

namespace sparsedge::cuda {
namespace {

constexpr int kMaxHeadDim = 256;   // channel indices are uint8
constexpr int kScoreWarps = 8;
constexpr int kPVThreads = 512;

template <typename TK, typename TV>
__global__ void delta_encode_kernel(const TK* __restrict__ k, float* __restrict__ ref, const float* __restrict__ theta,
                                    TV* __restrict__ values, uint8_t* __restrict__ chan, int32_t* __restrict__ offsets,
                                    int64_t* __restrict__ nnz, int32_t* __restrict__ overflow, int64_t T, int64_t H,
                                    int64_t D, int64_t cap, int64_t ostride, int64_t start) {
  __shared__ int scratch[33];
  const int64_t h = blockIdx.x;
  const int c = threadIdx.x;
  const bool active = c < D;
  int32_t* off = offsets + h * ostride;
  int64_t pos = off[start];
  const float th = theta[h];
  float r = active ? ref[h * D + c] : 0.f;
  int64_t total = 0;
  int32_t over = 0;
  for (int64_t t = 0; t < T; ++t) {
    const float dv = active ? to_f<TK>(k[(t * H + h) * D + c]) - r : 0.f;
    const bool keep = active && fabsf(dv) > th;
    int n = 0;
    const int before = block_exclusive_scan<int>(keep ? 1 : 0, scratch, &n);
    if (pos + n > cap) {  // block-uniform
      over = static_cast<int32_t>(pos + n);
      break;
    }
    if (keep) {
      const TV sv = from_f<TV>(dv);
      values[h * cap + pos + before] = sv;
      chan[h * cap + pos + before] = static_cast<uint8_t>(c);
      r += to_f<TV>(sv);
    }
    pos += n;
    total += n;
    if (c == 0) off[start + t + 1] = static_cast<int32_t>(pos);
  }
  if (active) ref[h * D + c] = r;
  if (c == 0) {
    nnz[h] = total;
    overflow[h] = over;
  }
}

struct ScoreGeom {
  int64_t n;      // keys of the whole call: start + T
  int64_t i0;     // first token of this chunk
  int64_t G;      // query heads per KV head
};

template <typename TQ, typename TC>
__global__ void delta_scores_kernel(DeltaAttnArgs a, ScoreGeom g, float* __restrict__ inc, float* __restrict__ ex) {
  __shared__ float qs[kMaxHeadDim];
  const int64_t z = blockIdx.z, ti = g.i0 + z, p = a.start + ti;
  const int64_t qh = blockIdx.y, h = qh / g.G, D = a.D;
  const TQ* q = static_cast<const TQ*>(a.q) + (ti * a.Hq + qh) * D;
  for (int64_t c = threadIdx.x; c < D; c += blockDim.x) qs[c] = to_f<TQ>(q[c]);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t j = int64_t(blockIdx.x) * kScoreWarps + (threadIdx.x >> 5);
  if (j > p) return;  // causal: never read by the softmax
  // delta increment q . d_j over the packed entries of token j
  const int32_t* off = a.offsets + h * a.offsets_stride;
  const int64_t e0 = off[j], e1 = off[j + 1];
  const TC* vals = static_cast<const TC*>(a.values) + h * a.cap;
  const uint8_t* ch = a.chan + h * a.cap;
  float s = 0.f;
  for (int64_t e = e0 + lane; e < e1; e += 32) s = fmaf(qs[ch[e]], to_f<TC>(vals[e]), s);
  s = warp_sum(s);
  // exact score for sinks and the local window (incl. the chunk's own keys)
  float x = 0.f;
  if (j < a.n_sink || j > p - a.window) {
    const int64_t ns = min64(a.n_sink, g.n);
    float d = 0.f;
    if (j < ns) {
      const TC* key = static_cast<const TC*>(a.sink_k) + (h * a.S + j) * D;
      for (int64_t c = lane; c < D; c += 32) d = fmaf(qs[c], to_f<TC>(key[c]), d);
    } else if (j >= a.start) {
      const TQ* key = static_cast<const TQ*>(a.k) + ((j - a.start) * a.H + h) * D;
      for (int64_t c = lane; c < D; c += 32) d = fmaf(qs[c], to_f<TQ>(key[c]), d);
    } else {  // start - window <= j < start: the ring of dense window keys
      const TC* key = static_cast<const TC*>(a.window_k) + (h * a.W_slots + j % a.window) * D;
      for (int64_t c = lane; c < D; c += 32) d = fmaf(qs[c], to_f<TC>(key[c]), d);
    }
    x = warp_sum(d);
  }
  if (lane == 0) {
    const int64_t o = (z * a.Hq + qh) * g.n + j;
    inc[o] = s;
    ex[o] = x;
  }
}

template <typename TQ, typename TC>
__global__ void delta_softmax_pv_kernel(DeltaAttnArgs a, ScoreGeom g, float* __restrict__ inc,
                                        const float* __restrict__ ex) {
  __shared__ float scratch[33];
  __shared__ float red[kPVThreads];
  const int64_t z = blockIdx.y, ti = g.i0 + z, p = a.start + ti, nk = p + 1;
  const int64_t qh = blockIdx.x, h = qh / g.G, D = a.D;
  float* sc = inc + (z * a.Hq + qh) * g.n;
  const float* xe = ex + (z * a.Hq + qh) * g.n;
  const int64_t per = (nk + blockDim.x - 1) / blockDim.x;
  const int64_t j0 = min64(nk, int64_t(threadIdx.x) * per), j1 = min64(nk, j0 + per);
  // 1. prefix sum over tokens: q . k_hat_j = sum_{t <= j} q . d_t
  float loc = 0.f;
  for (int64_t j = j0; j < j1; ++j) loc += sc[j];
  float tot = 0.f;
  float run = block_exclusive_scan<float>(loc, scratch, &tot);
  float m = -INFINITY;
  for (int64_t j = j0; j < j1; ++j) {
    run += sc[j];
    const bool exact = j < a.n_sink || j > p - a.window;
    const float s = (exact ? xe[j] : run) * a.scale;
    sc[j] = s;
    m = fmaxf(m, s);
  }
  m = block_max(m, scratch);
  // 2. softmax numerators (each thread rewrites only its own keys)
  float sum = 0.f;
  for (int64_t j = j0; j < j1; ++j) {
    const float e = __expf(sc[j] - m);
    sc[j] = e;
    sum += e;
  }
  sum = block_sum(sum, scratch);  // ends with __syncthreads: every sc[j] is visible to the block
  // 3. P . V
  const int64_t groups = blockDim.x / D, grp = threadIdx.x / D, c = threadIdx.x % D;
  float acc = 0.f;
  if (grp < groups) {
    const TC* v = static_cast<const TC*>(a.v_cache) + h * a.Tmax * D + c;
    for (int64_t j = grp; j < nk; j += groups) acc = fmaf(sc[j], to_f<TC>(v[j * D]), acc);
  }
  red[threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.x < D) {
    float o = 0.f;
    for (int64_t gg = 0; gg < groups; ++gg) o += red[gg * D + threadIdx.x];
    static_cast<TQ*>(a.out)[(ti * a.Hq + qh) * D + threadIdx.x] = from_f<TQ>(o / sum);
  }
}

}  // namespace

cudaError_t delta_encode(const void* k, float* ref, const float* theta, void* values, uint8_t* chan,
                         int32_t* offsets, int64_t* nnz, int32_t* overflow, int64_t T, int64_t H, int64_t D,
                         int64_t cap, int64_t offsets_stride, int64_t start, DType kt, DType vt,
                         cudaStream_t stream) {
  if (H == 0) return cudaSuccess;
  if (D > kMaxHeadDim || D <= 0) return cudaErrorInvalidValue;
  const int threads = static_cast<int>(ceil_div(D, 32) * 32);
  return dispatch_dtype(kt, [&](auto ktag) {
    using TK = typename decltype(ktag)::type;
    return dispatch_dtype(vt, [&](auto vtag) {
      using TV = typename decltype(vtag)::type;
      delta_encode_kernel<TK, TV><<<static_cast<unsigned>(H), threads, 0, stream>>>(
          static_cast<const TK*>(k), ref, theta, static_cast<TV*>(values), chan, offsets, nnz, overflow, T, H, D, cap,
          offsets_stride, start);
      return cudaGetLastError();
    });
  });
}

int64_t delta_attention_workspace_bytes(int64_t tokens, int64_t Hq, int64_t n) { return 2 * tokens * Hq * n * 4; }

cudaError_t delta_attention(const DeltaAttnArgs& a, DType qt, DType ct, void* workspace, int64_t workspace_bytes,
                            cudaStream_t stream) {
  if (a.T == 0 || a.Hq == 0) return cudaSuccess;
  if (a.D > kMaxHeadDim || a.D <= 0 || a.H <= 0 || a.Hq % a.H != 0) return cudaErrorInvalidValue;
  const int64_t n = a.start + a.T;
  const int64_t per_token = delta_attention_workspace_bytes(1, a.Hq, n);
  const int64_t chunk = max64(1, min64(a.T, workspace_bytes / per_token));
  if (workspace_bytes < per_token) return cudaErrorInvalidValue;
  float* inc = static_cast<float*>(workspace);
  float* ex = inc + chunk * a.Hq * n;
  return dispatch_dtype(qt, [&](auto qtag) {
    using TQ = typename decltype(qtag)::type;
    return dispatch_dtype(ct, [&](auto ctag) {
      using TC = typename decltype(ctag)::type;
      for (int64_t i0 = 0; i0 < a.T; i0 += chunk) {
        const int64_t tn = min64(chunk, a.T - i0);
        const ScoreGeom g{n, i0, a.Hq / a.H};
        // keys j <= start + i0 + tn - 1 are needed by this chunk
        const int64_t keys = a.start + i0 + tn;
        const dim3 g1(static_cast<unsigned>(ceil_div(keys, kScoreWarps)), static_cast<unsigned>(a.Hq),
                      static_cast<unsigned>(tn));
        delta_scores_kernel<TQ, TC><<<g1, 32 * kScoreWarps, 0, stream>>>(a, g, inc, ex);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return e;
        const dim3 g2(static_cast<unsigned>(a.Hq), static_cast<unsigned>(tn));
        delta_softmax_pv_kernel<TQ, TC><<<g2, kPVThreads, 0, stream>>>(a, g, inc, ex);
        e = cudaGetLastError();
        if (e != cudaSuccess) return e;
      }
      return cudaSuccess;
    });
  });
}

}  // namespace sparsedge::cuda
