// Torch glue of the sparsedge CUDA kernels: registers them for the CUDA dispatch key of the `sparsedge`
// ops declared in sdk/ops (same schema as the composite references and the CPU kernels).
//
// Each wrapper checks devices / shapes / dtypes with a TORCH_CHECK naming the op and the argument,
// makes inputs contiguous (a no-op for the Session's tensors), allocates outputs and fp32 workspace
// from torch's caching allocator (no sync), and enqueues the raw-pointer launchers of launchers.h on
// the current stream. Only headers that a CUDA toolkit without cuBLAS/cuSPARSE dev files provides are
// used (c10/cuda, not ATen/cuda/CUDAContext.h).
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "launchers.h"

namespace sparsedge::cuda {
namespace {

#define SD_CHECK_CUDA(op, t) TORCH_CHECK((t).is_cuda(), op, ": `" #t "` must be a CUDA tensor, got ", (t).device())
#define SD_CHECK_SAME_DEVICE(op, a, b) \
  TORCH_CHECK((a).device() == (b).device(), op, ": `" #a "` and `" #b "` are on different devices (", \
              (a).device(), " vs ", (b).device(), ")")
#define SD_CHECK_LAUNCH(op, expr)                                                   \
  do {                                                                              \
    const cudaError_t sd_err_ = (expr);                                             \
    TORCH_CHECK(sd_err_ == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(sd_err_)); \
  } while (0)

DType dtype_of(const char* op, const char* what, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, op, ": `", what, "` must be float32, float16 or bfloat16, got ", t);
  }
  return DType::F32;
}

bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

at::Tensor workspace(const at::Tensor& like, int64_t bytes) {
  return at::empty({std::max<int64_t>(bytes, 256)}, like.options().dtype(at::kByte));
}

// unknown names throw std::invalid_argument (a ValueError in Python) listing the supported ones
Act parse_activation(c10::string_view name) {
  return sparsedge::parse_activation(std::string_view(name.data(), name.size()));
}

// ---- norm -------------------------------------------------------------------------------------
at::Tensor norm_weight(const char* op, const at::Tensor& weight, const at::Tensor& x) {
  SD_CHECK_SAME_DEVICE(op, weight, x);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must be [", x.size(-1), "], got ",
              weight.sizes());
  // weights in x's dtype or fp32 are used as they are; anything else is converted to fp32 (exact)
  if (weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat) return weight.contiguous();
  return weight.to(at::kFloat).contiguous();
}

at::Tensor rms_norm_cuda(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  SD_CHECK_CUDA("rms_norm", x_in);
  TORCH_CHECK(x_in.dim() >= 1, "rms_norm: x must have at least one dimension");
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  auto w = norm_weight("rms_norm", weight, x);
  auto y = at::empty_like(x);
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  const DType xt = dtype_of("rms_norm", "x", x.scalar_type());
  SD_CHECK_LAUNCH("rms_norm", rms_norm(x.data_ptr(), w.data_ptr(), y.data_ptr(), nullptr, rows, d,
                                       static_cast<float>(eps), xt, dtype_of("rms_norm", "weight", w.scalar_type()),
                                       stream_of(x)));
  return y;
}

at::Tensor add_rms_norm_cuda(at::Tensor& residual, const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  SD_CHECK_CUDA("add_rms_norm", residual);
  SD_CHECK_SAME_DEVICE("add_rms_norm", residual, x_in);
  TORCH_CHECK(residual.is_contiguous(), "add_rms_norm: residual is updated in place and must be contiguous");
  TORCH_CHECK(residual.sizes() == x_in.sizes(), "add_rms_norm: residual ", residual.sizes(), " and x ",
              x_in.sizes(), " shapes differ");
  c10::cuda::CUDAGuard guard(residual.device());
  auto x = x_in.to(residual.scalar_type()).contiguous();
  auto w = norm_weight("add_rms_norm", weight, residual);
  auto y = at::empty_like(residual);
  const int64_t d = residual.size(-1), rows = d ? residual.numel() / d : 0;
  const DType rt = dtype_of("add_rms_norm", "residual", residual.scalar_type());
  SD_CHECK_LAUNCH("add_rms_norm", rms_norm(x.data_ptr(), w.data_ptr(), y.data_ptr(), residual.data_ptr(), rows, d,
                                           static_cast<float>(eps), rt,
                                           dtype_of("add_rms_norm", "weight", w.scalar_type()), stream_of(x)));
  return y;
}

at::Tensor rope_cuda(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  SD_CHECK_CUDA("rope", x_in);
  SD_CHECK_SAME_DEVICE("rope", x_in, cos_in);
  SD_CHECK_SAME_DEVICE("rope", x_in, sin_in);
  TORCH_CHECK(x_in.dim() == 3, "rope: x must be [T, H, D], got ", x_in.sizes());
  TORCH_CHECK(x_in.size(2) % 2 == 0, "rope: head dim must be even, got ", x_in.size(2));
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  auto c = cos_in.to(at::kFloat).contiguous();
  auto s = sin_in.to(at::kFloat).contiguous();
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  TORCH_CHECK(c.dim() == 2 && c.size(0) == T && c.size(1) == D / 2 && s.sizes() == c.sizes(),
              "rope: cos/sin must be [T, D/2] = [", T, ", ", D / 2, "], got ", c.sizes(), " and ", s.sizes());
  auto y = at::empty_like(x);
  SD_CHECK_LAUNCH("rope", rope(x.data_ptr(), c.data_ptr<float>(), s.data_ptr<float>(), y.data_ptr(), T, H, D,
                               dtype_of("rope", "x", x.scalar_type()), stream_of(x)));
  return y;
}

// ---- FFN --------------------------------------------------------------------------------------
struct PredictorArgs {
  at::Tensor x, p1, p2, bias;
  int64_t T, d, r, I;
};

PredictorArgs check_predictor(const char* op, const at::Tensor& x, const at::Tensor& p1, const at::Tensor& p2,
                              const at::Tensor& bias) {
  SD_CHECK_CUDA(op, x);
  SD_CHECK_SAME_DEVICE(op, x, p1);
  SD_CHECK_SAME_DEVICE(op, x, p2);
  SD_CHECK_SAME_DEVICE(op, x, bias);
  TORCH_CHECK(x.dim() == 2, op, ": x must be [T, d], got ", x.sizes());
  TORCH_CHECK(p1.dim() == 2 && p1.size(1) == x.size(1), op, ": p1 must be [r, d=", x.size(1), "], got ", p1.sizes());
  TORCH_CHECK(p2.dim() == 2 && p2.size(1) == p1.size(0), op, ": p2 must be [I, r=", p1.size(0), "], got ",
              p2.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == p2.size(0), op, ": bias must be [I=", p2.size(0), "], got ",
              bias.sizes());
  TORCH_CHECK(is_float_type(p1.scalar_type()), op, ": p1 must be float32, float16 or bfloat16, got ",
              p1.scalar_type());
  dtype_of(op, "x", x.scalar_type());
  PredictorArgs a;
  const auto pt = p1.scalar_type();  // one predictor dtype: p2/bias follow p1 (a no-op when they match)
  a.x = x.contiguous();
  a.p1 = p1.contiguous();
  a.p2 = p2.to(pt).contiguous();
  a.bias = bias.to(pt).contiguous();
  a.T = x.size(0);
  a.d = x.size(1);
  a.r = p1.size(0);
  a.I = p2.size(0);
  TORCH_CHECK(a.d <= kMaxStagedFloats, op, ": d=", a.d, " exceeds the kernels' limit of ", kMaxStagedFloats);
  TORCH_CHECK(a.r + 256 <= kMaxStagedFloats, op, ": predictor rank r=", a.r, " exceeds the kernels' limit of ",
              kMaxStagedFloats - 256);
  return a;
}

void launch_predict(const PredictorArgs& a, at::Tensor& idx, at::Tensor& count) {
  auto ws = workspace(a.x, ffn_predict_workspace_bytes(a.T, a.r, a.I));
  SD_CHECK_LAUNCH("ffn_predict", ffn_predict(a.x.data_ptr(), a.p1.data_ptr(), a.p2.data_ptr(), a.bias.data_ptr(),
                                             idx.data_ptr<int32_t>(), count.data_ptr<int32_t>(), a.T, a.d, a.r, a.I,
                                             dtype_of("ffn_predict", "x", a.x.scalar_type()),
                                             dtype_of("ffn_predict", "p1", a.p1.scalar_type()), ws.data_ptr(),
                                             stream_of(a.x)));
}

std::tuple<at::Tensor, at::Tensor> ffn_predict_cuda(const at::Tensor& x, const at::Tensor& p1, const at::Tensor& p2,
                                                    const at::Tensor& bias) {
  c10::cuda::CUDAGuard guard(x.device());
  auto a = check_predictor("ffn_predict", x, p1, p2, bias);
  auto idx = at::empty({a.T, a.I}, a.x.options().dtype(at::kInt));
  auto count = at::empty({a.T}, a.x.options().dtype(at::kInt));
  launch_predict(a, idx, count);
  return {idx, count};
}

// 4-bit gate x up predictor: q [I, 2, d/2] uint8 is read in place (it must be contiguous, like the FFN
// weights); scale / thresh are converted to fp32 only when they are not already (a no-op for the Session's).
std::tuple<at::Tensor, at::Tensor> ffn_predict_q4_cuda(const at::Tensor& x_in, const at::Tensor& q,
                                                       const at::Tensor& scale_in, const at::Tensor& thresh_in,
                                                       c10::string_view activation, double act_param) {
  const char* op = "ffn_predict_q4";
  SD_CHECK_CUDA(op, x_in);
  SD_CHECK_SAME_DEVICE(op, x_in, q);
  SD_CHECK_SAME_DEVICE(op, x_in, scale_in);
  SD_CHECK_SAME_DEVICE(op, x_in, thresh_in);
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be [T, d], got ", x_in.sizes());
  c10::cuda::CUDAGuard guard(x_in.device());
  const Act act = parse_activation(activation);
  auto x = x_in.contiguous();
  const DType xt = dtype_of(op, "x", x.scalar_type());
  const int64_t T = x.size(0), d = x.size(1);
  TORCH_CHECK(q.scalar_type() == at::kByte && q.dim() == 3 && q.size(1) == 2 && q.size(2) * 2 == d, op,
              ": q must be uint8 [I, 2, d/2] with d = ", d, ", got ", q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(q.is_contiguous(), op, ": q (the 4-bit gate/up weights) must be contiguous (place it once with "
              "Backend.place)");
  const int64_t I = q.size(0);
  TORCH_CHECK(scale_in.dim() == 3 && scale_in.size(0) == I && scale_in.size(1) == 2 && scale_in.size(2) > 0 &&
                  d % scale_in.size(2) == 0 && d / scale_in.size(2) >= 2 && (d / scale_in.size(2)) % 2 == 0,
              op, ": scale must be [I=", I, ", 2, d/G] with an even group size G dividing d=", d, ", got ",
              scale_in.sizes());
  TORCH_CHECK(is_float_type(scale_in.scalar_type()), op, ": scale must be float32 (or float16/bfloat16), got ",
              scale_in.scalar_type());
  TORCH_CHECK(thresh_in.numel() == I, op, ": thresh must be [I=", I, "], got ", thresh_in.sizes());
  TORCH_CHECK(is_float_type(thresh_in.scalar_type()), op, ": thresh must be float32 (or float16/bfloat16), got ",
              thresh_in.scalar_type());
  const int64_t ng = scale_in.size(2), G = d / ng;
  TORCH_CHECK(d + 8 * ng <= kMaxQ4StagedBytes, op, ": d=", d, " with group size ", G,
              " exceeds the kernels' shared-memory limit (d + 8 d/G <= ", kMaxQ4StagedBytes, ")");
  auto scale = scale_in.to(at::kFloat).contiguous();
  auto thresh = thresh_in.to(at::kFloat).contiguous();
  auto idx = at::empty({T, I}, x.options().dtype(at::kInt));
  auto count = at::empty({T}, x.options().dtype(at::kInt));
  auto ws = workspace(x, ffn_predict_q4_workspace_bytes(T, d, G, I));
  SD_CHECK_LAUNCH(op, ffn_predict_q4(x.data_ptr(), q.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                                     thresh.data_ptr<float>(), idx.data_ptr<int32_t>(), count.data_ptr<int32_t>(), T,
                                     d, G, I, act, static_cast<float>(act_param), xt, ws.data_ptr(), stream_of(x)));
  return {idx, count};
}

struct FFNWeights {
  at::Tensor wg, wu, wd;
  int64_t I;
};

FFNWeights check_ffn_weights(const char* op, const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                             const at::Tensor& w_down_t) {
  SD_CHECK_SAME_DEVICE(op, x, w_gate);
  SD_CHECK_SAME_DEVICE(op, x, w_up);
  SD_CHECK_SAME_DEVICE(op, x, w_down_t);
  const int64_t d = x.size(1);
  TORCH_CHECK(w_gate.dim() == 2 && w_gate.size(1) == d, op, ": w_gate must be [I, d=", d, "], got ", w_gate.sizes());
  TORCH_CHECK(w_up.sizes() == w_gate.sizes(), op, ": w_up must match w_gate ", w_gate.sizes(), ", got ",
              w_up.sizes());
  TORCH_CHECK(w_down_t.sizes() == w_gate.sizes(), op, ": w_down_t (W_down transposed) must be [I, d] = ",
              w_gate.sizes(), ", got ", w_down_t.sizes());
  TORCH_CHECK(w_up.scalar_type() == w_gate.scalar_type() && w_down_t.scalar_type() == w_gate.scalar_type(), op,
              ": w_gate, w_up and w_down_t must share one dtype, got ", w_gate.scalar_type(), ", ",
              w_up.scalar_type(), ", ", w_down_t.scalar_type());
  dtype_of(op, "w_gate", w_gate.scalar_type());
  TORCH_CHECK(d <= kMaxStagedFloats, op, ": d=", d, " exceeds the kernels' limit of ", kMaxStagedFloats);
  // weights are read in place: a non-contiguous weight would be copied on every call, so refuse it
  TORCH_CHECK(w_gate.is_contiguous() && w_up.is_contiguous() && w_down_t.is_contiguous(), op,
              ": FFN weights must be contiguous (place them once with Backend.place)");
  return {w_gate, w_up, w_down_t, w_gate.size(0)};
}

void launch_rows(const char* op, const at::Tensor& x, const at::Tensor& idx, const at::Tensor& count,
                 const FFNWeights& w, c10::string_view activation, double act_param, double tau, at::Tensor& y,
                 at::Tensor& down_count) {
  const int64_t T = x.size(0), d = x.size(1);
  const int dev = x.device().index();
  auto ws = workspace(x, ffn_rows_workspace_bytes(T, d, w.I, dev));
  SD_CHECK_LAUNCH(op, sparse_ffn_rows(x.data_ptr(), idx.data_ptr<int32_t>(), count.data_ptr<int32_t>(),
                                      w.wg.data_ptr(), w.wu.data_ptr(), w.wd.data_ptr(), y.data_ptr(),
                                      down_count.data_ptr<int32_t>(), T, d, w.I, parse_activation(activation),
                                      static_cast<float>(act_param), static_cast<float>(tau),
                                      dtype_of(op, "x", x.scalar_type()), dtype_of(op, "w_gate", w.wg.scalar_type()),
                                      ws.data_ptr(), dev, stream_of(x)));
}

std::tuple<at::Tensor, at::Tensor> sparse_ffn_rows_cuda(const at::Tensor& x_in, const at::Tensor& idx_in,
                                                        const at::Tensor& count_in, const at::Tensor& w_gate,
                                                        const at::Tensor& w_up, const at::Tensor& w_down_t,
                                                        c10::string_view activation, double act_param, double tau) {
  const char* op = "sparse_ffn_rows";
  SD_CHECK_CUDA(op, x_in);
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be [T, d], got ", x_in.sizes());
  c10::cuda::CUDAGuard guard(x_in.device());
  parse_activation(activation);
  auto x = x_in.contiguous();
  dtype_of(op, "x", x.scalar_type());
  auto w = check_ffn_weights(op, x, w_gate, w_up, w_down_t);
  const int64_t T = x.size(0);
  SD_CHECK_SAME_DEVICE(op, x, idx_in);
  SD_CHECK_SAME_DEVICE(op, x, count_in);
  TORCH_CHECK(idx_in.dim() == 2 && idx_in.size(0) == T && idx_in.size(1) == w.I, op, ": idx must be [T, I] = [", T,
              ", ", w.I, "], got ", idx_in.sizes());
  TORCH_CHECK(count_in.dim() == 1 && count_in.size(0) == T, op, ": count must be [T=", T, "], got ",
              count_in.sizes());
  auto idx = idx_in.to(at::kInt).contiguous();
  auto count = count_in.to(at::kInt).contiguous();
  auto y = at::empty_like(x);
  auto down_count = at::empty({T}, x.options().dtype(at::kInt));
  launch_rows(op, x, idx, count, w, activation, act_param, tau, y, down_count);
  return {y, down_count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_ffn_cuda(const at::Tensor& x_in, const at::Tensor& p1,
                                                               const at::Tensor& p2, const at::Tensor& bias,
                                                               const at::Tensor& w_gate, const at::Tensor& w_up,
                                                               const at::Tensor& w_down_t, c10::string_view activation,
                                                               double act_param, double tau) {
  const char* op = "sparse_ffn";
  c10::cuda::CUDAGuard guard(x_in.device());
  parse_activation(activation);
  auto a = check_predictor(op, x_in, p1, p2, bias);
  auto w = check_ffn_weights(op, a.x, w_gate, w_up, w_down_t);
  TORCH_CHECK(a.I == w.I, op, ": predictor has I=", a.I, " neurons but the FFN weights have I=", w.I);
  auto idx = at::empty({a.T, a.I}, a.x.options().dtype(at::kInt));
  auto count = at::empty({a.T}, a.x.options().dtype(at::kInt));
  auto y = at::empty_like(a.x);
  auto down_count = at::empty({a.T}, a.x.options().dtype(at::kInt));
  // everything stays on the device: count is never read on the host
  launch_predict(a, idx, count);
  launch_rows(op, a.x, idx, count, w, activation, act_param, tau, y, down_count);
  return {y, count, down_count};
}

// ---- delta attention ----------------------------------------------------------------------------
at::Tensor delta_encode_cuda(const at::Tensor& k_in, at::Tensor& ref, const at::Tensor& theta_in, at::Tensor& values,
                             at::Tensor& chan, at::Tensor& offsets, int64_t start) {
  const char* op = "delta_encode";
  SD_CHECK_CUDA(op, k_in);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&ref, &values, &chan, &offsets})
    TORCH_CHECK(t->device() == k_in.device(), op, ": all tensors must be on ", k_in.device());
  TORCH_CHECK(k_in.dim() == 3, op, ": k must be [T, H, D], got ", k_in.sizes());
  c10::cuda::CUDAGuard guard(k_in.device());
  auto k = k_in.contiguous();
  const int64_t T = k.size(0), H = k.size(1), D = k.size(2);
  TORCH_CHECK(D <= 256, op, ": head dim ", D, " > 256 cannot be indexed by uint8 channel ids");
  TORCH_CHECK(ref.scalar_type() == at::kFloat && ref.is_contiguous() && ref.dim() == 2 && ref.size(0) == H &&
                  ref.size(1) == D,
              op, ": ref must be a contiguous float32 [H, D] = [", H, ", ", D, "] tensor, got ", ref.scalar_type(),
              " ", ref.sizes());
  TORCH_CHECK(values.dim() == 2 && values.size(0) == H && values.is_contiguous(), op,
              ": values must be contiguous [H, cap], got ", values.sizes());
  TORCH_CHECK(chan.scalar_type() == at::kByte && chan.sizes() == values.sizes() && chan.is_contiguous(), op,
              ": chan must be contiguous uint8 shaped like values ", values.sizes(), ", got ", chan.scalar_type(), " ",
              chan.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.dim() == 2 && offsets.size(0) == H &&
                  offsets.is_contiguous(),
              op, ": offsets must be contiguous int32 [H, Tmax+1], got ", offsets.scalar_type(), " ", offsets.sizes());
  TORCH_CHECK(start >= 0 && start + T + 1 <= offsets.size(1), op, ": positions ", start, "..", start + T,
              " do not fit offsets of length ", offsets.size(1));
  // theta may live on the host (a per-layer config): a tiny copy, made once per call
  auto theta = theta_in.to(k.device(), at::kFloat).contiguous().reshape({-1});
  TORCH_CHECK(theta.numel() == H, op, ": theta must have one threshold per KV head (", H, "), got ", theta.numel());
  const int64_t cap = values.size(1);
  auto nnz = at::empty({H}, k.options().dtype(at::kLong));
  auto overflow = at::empty({H}, k.options().dtype(at::kInt));
  SD_CHECK_LAUNCH(op, delta_encode(k.data_ptr(), ref.data_ptr<float>(), theta.data_ptr<float>(), values.data_ptr(),
                                   chan.data_ptr<uint8_t>(), offsets.data_ptr<int32_t>(), nnz.data_ptr<int64_t>(),
                                   overflow.data_ptr<int32_t>(), T, H, D, cap, offsets.size(1), start,
                                   dtype_of(op, "k", k.scalar_type()), dtype_of(op, "values", values.scalar_type()),
                                   stream_of(k)));
  // The reference raises on overflow. Positions < start hold at most D entries each, so when
  // (start + T) * D <= cap overflow is impossible and no host sync is needed (the common case for a
  // buffer sized for the context); otherwise read the flags back (one small sync) and raise.
  if ((start + T) * D > cap) {
    auto over = overflow.cpu();
    const int32_t* o = over.data_ptr<int32_t>();
    for (int64_t h = 0; h < H; ++h)
      TORCH_CHECK(o[h] == 0, "delta buffer capacity exceeded: head ", h, " needs ", o[h], " > ", cap, " entries");
  }
  return nnz;
}

at::Tensor delta_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const at::Tensor& values_in, const at::Tensor& chan_in, const at::Tensor& offsets_in,
                                const at::Tensor& sink_in, const at::Tensor& window_in, int64_t start, int64_t n_sink,
                                int64_t window, double scale) {
  const char* op = "delta_attention";
  SD_CHECK_CUDA(op, q_in);
  for (const at::Tensor* t :
       std::initializer_list<const at::Tensor*>{&k_in, &v_in, &values_in, &chan_in, &offsets_in, &sink_in, &window_in})
    TORCH_CHECK(t->device() == q_in.device(), op, ": all tensors must be on ", q_in.device());
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3, op, ": q must be [T, Hq, D] and k [T, H, D], got ", q_in.sizes(),
              " and ", k_in.sizes());
  c10::cuda::CUDAGuard guard(q_in.device());
  auto q = q_in.contiguous();
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), H = k_in.size(1);
  TORCH_CHECK(k_in.size(0) == T && k_in.size(2) == D, op, ": k must be [T=", T, ", H, D=", D, "], got ",
              k_in.sizes());
  TORCH_CHECK(H > 0 && Hq % H == 0, op, ": query heads ", Hq, " must be a multiple of KV heads ", H);
  TORCH_CHECK(D <= 256, op, ": head dim ", D, " > 256 is not supported (uint8 channel ids)");
  TORCH_CHECK(start >= 0 && n_sink >= 0 && window >= 0, op, ": start, n_sink and window must be >= 0");
  const DType qt = dtype_of(op, "q", q.scalar_type());
  const auto cdt = values_in.scalar_type();
  const DType ct = dtype_of(op, "values", cdt);
  // one cache dtype for values / v_cache / sink / window keys; k follows q (no-ops when they already match)
  auto k = k_in.to(q.scalar_type()).contiguous();
  auto values = values_in.contiguous();
  auto chan = chan_in.contiguous();
  auto offsets = offsets_in.contiguous();
  auto v = v_in.to(cdt).contiguous();
  auto sink = sink_in.to(cdt).contiguous();
  auto win = window_in.to(cdt).contiguous();
  const int64_t n = start + T;
  TORCH_CHECK(values.dim() == 2 && values.size(0) == H, op, ": values must be [H=", H, ", cap], got ",
              values.sizes());
  TORCH_CHECK(chan.scalar_type() == at::kByte && chan.sizes() == values.sizes(), op,
              ": chan must be uint8 shaped like values, got ", chan.scalar_type(), " ", chan.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.dim() == 2 && offsets.size(0) == H &&
                  offsets.size(1) >= n + 1,
              op, ": offsets must be int32 [H, >= ", n + 1, "], got ", offsets.scalar_type(), " ", offsets.sizes());
  TORCH_CHECK(v.dim() == 3 && v.size(0) == H && v.size(1) >= n && v.size(2) == D, op, ": v_cache must be [H=", H,
              ", Tmax >= ", n, ", D=", D, "], got ", v.sizes());
  const int64_t ns = std::min(n_sink, n);
  TORCH_CHECK(sink.dim() == 3 && sink.size(0) == H && sink.size(1) >= ns && (ns == 0 || sink.size(2) == D), op,
              ": sink_k must be [H, >= ", ns, ", D], got ", sink.sizes());
  const bool reads_window = window > 0 && std::max(ns, start - window) < start;
  TORCH_CHECK(win.dim() == 3 && win.size(0) == H && (!reads_window || (win.size(1) >= window && win.size(2) == D)),
              op, ": window_k must be [H, W >= ", window, ", D], got ", win.sizes());
  auto out = at::empty_like(q);
  // bound the fp32 score workspace (2 x tokens x Hq x n) at 256 MiB by chunking the tokens of a prefill
  const int64_t per_token = delta_attention_workspace_bytes(1, Hq, n);
  const int64_t tokens = std::max<int64_t>(1, std::min<int64_t>(T, (int64_t(256) << 20) / std::max<int64_t>(per_token, 1)));
  const int64_t ws_bytes = delta_attention_workspace_bytes(tokens, Hq, n);
  auto ws = workspace(q, ws_bytes);
  DeltaAttnArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v_cache = v.data_ptr();
  a.values = values.data_ptr();
  a.chan = chan.data_ptr<uint8_t>();
  a.offsets = offsets.data_ptr<int32_t>();
  a.sink_k = sink.data_ptr();
  a.window_k = win.data_ptr();
  a.out = out.data_ptr();
  a.T = T; a.Hq = Hq; a.H = H; a.D = D;
  a.Tmax = v.size(1);
  a.cap = values.size(1);
  a.offsets_stride = offsets.size(1);
  a.S = sink.size(1);
  a.W_slots = win.size(1);
  a.start = start; a.n_sink = n_sink; a.window = window;
  a.scale = static_cast<float>(scale);
  SD_CHECK_LAUNCH(op, delta_attention(a, qt, ct, ws.data_ptr(), ws_bytes, stream_of(q)));
  return out;
}

// The delta cache's decode step (sdk/sparsedge/ops/delta.py delta_step_ref) as the kernels above plus two slice
// copies, in the reference's order: one op call per layer instead of five, and no host read (the encode's
// overflow read-back happens only when the buffer is near full, as in delta_encode_cuda).
at::Tensor delta_step_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& ref,
                           const at::Tensor& theta, at::Tensor& values, at::Tensor& chan, at::Tensor& offsets,
                           const at::Tensor& sink_k, at::Tensor& window_k, at::Tensor& v_cache, int64_t pos,
                           int64_t n_sink, int64_t window, double scale) {
  const char* op = "delta_step";
  SD_CHECK_CUDA(op, q);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.size(0) == 1 && k.size(0) == 1 && v.size(0) == 1,
              op, ": one token per call (q [1, Hq, D], k and v [1, H, D])");
  const int64_t Tmax = v_cache.size(1), H = k.size(1);
  TORCH_CHECK(pos >= n_sink && pos >= window && pos < Tmax, op, ": position ", pos, " needs n_sink (", n_sink,
              ") <= pos, window (", window, ") <= pos and pos < ", Tmax, " (the cache's tokens)");
  TORCH_CHECK(window == 0 || (window_k.dim() == 3 && window_k.size(1) == window), op,
              ": window_k must be [H, window, D], got ", window_k.sizes());
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t e = pos - window;
  v_cache.select(1, pos).copy_(v[0]);
  if (window == 0) {
    delta_encode_cuda(k, ref, theta, values, chan, offsets, pos);
    return delta_attention_cuda(q, k, v_cache, values, chan, offsets, sink_k, window_k, pos, n_sink, window, scale);
  }
  const at::Tensor slot = window_k.select(1, pos % window);  // position e's key, which k replaces afterwards
  delta_encode_cuda(slot.unsqueeze(0), ref, theta, values, chan, offsets, e);
  offsets.narrow(1, e + 2, window).copy_(offsets.narrow(1, e + 1, 1).expand({H, window}));  // the window: empty
  at::Tensor out =
      delta_attention_cuda(q, k, v_cache, values, chan, offsets, sink_k, window_k, pos, n_sink, window, scale);
  slot.copy_(k[0]);
  return out;
}

at::Tensor attention_cuda(const char* op, const at::Tensor& q_in, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, int64_t start, double scale, int64_t window) {
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0: no window), got ", window);
  SD_CHECK_CUDA(op, q_in);
  SD_CHECK_SAME_DEVICE(op, k_cache, q_in);
  SD_CHECK_SAME_DEVICE(op, v_cache, q_in);
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), op,
              ": q must be [T, Hq, D] and k_cache/v_cache the same [H, Tmax, D], got ", q_in.sizes(), ", ",
              k_cache.sizes(), ", ", v_cache.sizes());
  c10::cuda::CUDAGuard guard(q_in.device());
  auto k = k_cache.contiguous();
  auto v = v_cache.to(k.scalar_type()).contiguous();
  auto q = q_in.to(k.scalar_type()).contiguous();
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), H = k.size(0), Tmax = k.size(1);
  TORCH_CHECK(k.size(2) == D && D <= 256, op, ": head dim must match and be <= 256");
  TORCH_CHECK(H > 0 && Hq % H == 0, op, ": query heads ", Hq, " must be a multiple of KV heads ", H);
  TORCH_CHECK(start >= 0 && start + T <= Tmax, op, ": positions ", start, "..", start + T - 1,
              " exceed the cache capacity ", Tmax);
  const DType dt = dtype_of(op, "k_cache", k.scalar_type());
  auto out = at::empty_like(q);
  auto ws = workspace(q, dense_attention_workspace_bytes(T, Hq, start));
  SD_CHECK_LAUNCH(op, dense_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                      static_cast<float*>(ws.data_ptr()), T, Hq, H, D, Tmax, start,
                                      static_cast<float>(scale), dt, stream_of(q), window));
  return out.to(q_in.scalar_type());
}

at::Tensor dense_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                int64_t start, double scale) {
  return attention_cuda("dense_attention", q, k_cache, v_cache, start, scale, 0);
}

at::Tensor dense_attention_window_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       int64_t start, double scale, int64_t window) {
  return attention_cuda("dense_attention_window", q, k_cache, v_cache, start, scale, window);
}

// Dense projections: cuBLAS through ATen is the right kernel on the GPU (the schema has them as ops
// so the CPU can stream weights its own way); registered here so CUDA never takes the composite path.
at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  SD_CHECK_CUDA("linear", x);
  return at::linear(x, w, bias);
}
at::Tensor linear_t_cuda(const at::Tensor& x, const at::Tensor& w_t) {
  SD_CHECK_CUDA("linear_t", x);
  return at::matmul(x, w_t);
}

// ---- bitlinear ----------------------------------------------------------------------------------
// the CPU kernel's checks and messages (backends/cpu/bitlinear.cpp), in its order
at::Tensor bitlinear_cuda(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& scale_in) {
  TORCH_CHECK_VALUE(w_in.dim() == 2 && w_in.scalar_type() == at::kByte && w_in.size(1) > 0,
                    "bitlinear: w must be uint8 [N/4, K] (4 ternary rows per byte row), got ", w_in.scalar_type(),
                    " ", w_in.sizes());
  const int64_t P = w_in.size(0), K = w_in.size(1), N = 4 * P;
  TORCH_CHECK_VALUE(x_in.dim() >= 1 && x_in.size(-1) == K && at::isFloatingType(x_in.scalar_type()),
                    "bitlinear: x must be a float tensor [..., K=", K, "], got ", x_in.scalar_type(), " ",
                    x_in.sizes());
  TORCH_CHECK_VALUE(scale_in.dim() == 1 && scale_in.size(0) == N && scale_in.scalar_type() == at::kFloat,
                    "bitlinear: scale must be float32 [N=", N, "] (one per output row), got ", scale_in.scalar_type(),
                    " ", scale_in.sizes());
  SD_CHECK_CUDA("bitlinear", x_in);
  SD_CHECK_SAME_DEVICE("bitlinear", x_in, w_in);
  SD_CHECK_SAME_DEVICE("bitlinear", x_in, scale_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t T = x_in.numel() / K;
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  // x in fp32 / fp16 / bf16 as it is; anything else (fp64) as fp32, y cast back at the end
  auto x = (is_float_type(x_in.scalar_type()) ? x_in : x_in.to(at::kFloat)).reshape({T, K}).contiguous();
  auto w = w_in.contiguous();
  auto scale = scale_in.contiguous();
  auto y = at::empty({T, N}, x.options().dtype(at::kFloat));
  if (T == 0 || N == 0) return y.to(x_in.scalar_type()).reshape(sizes);
  at::Tensor ws = workspace(x, bitlinear_workspace_bytes(T, K));
  SD_CHECK_LAUNCH("bitlinear", bitlinear(x.data_ptr(), w.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                                         y.data_ptr<float>(), T, P, K, dtype_of("bitlinear", "x", x.scalar_type()),
                                         ws.data_ptr(), stream_of(x)));
  return y.to(x_in.scalar_type()).reshape(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsedge, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("add_rms_norm", &add_rms_norm_cuda);
  m.impl("rope", &rope_cuda);
  m.impl("ffn_predict", &ffn_predict_cuda);
  m.impl("ffn_predict_q4", &ffn_predict_q4_cuda);
  m.impl("sparse_ffn_rows", &sparse_ffn_rows_cuda);
  m.impl("sparse_ffn", &sparse_ffn_cuda);
  m.impl("delta_encode", &delta_encode_cuda);
  m.impl("delta_attention", &delta_attention_cuda);
  m.impl("delta_step", &delta_step_cuda);
  m.impl("dense_attention", &dense_attention_cuda);
  m.impl("dense_attention_window", &dense_attention_window_cuda);
  m.impl("linear", &linear_cuda);
  m.impl("linear_t", &linear_t_cuda);
  m.impl("bitlinear", &bitlinear_cuda);
}

}  // namespace sparsedge::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsedge fused CUDA kernels (registered for the CUDA dispatch key of the sparsedge ops)";
  m.attr("OPS") = pybind11::make_tuple("rms_norm", "add_rms_norm", "rope", "ffn_predict", "ffn_predict_q4",
                                       "sparse_ffn_rows", "sparse_ffn", "delta_encode", "delta_attention",
                                       "dense_attention", "dense_attention_window", "linear", "linear_t",
                                       "bitlinear");
}
