// DecodePlan: the decoder's layer loop for one token, in C++ (sdk/sparsedge/fused_step.py builds and runs it).
//
// Why: at SmolLM2's size a decode step is ~120 short kernels (a 576-wide layer's projections take 10-40 us each)
// and the Python between them (slicing, reshapes, the cache write, op dispatch: ~15 calls per layer) cost about
// 1 ms of a 6 ms token. This loop calls the same sparsedge ops through the dispatcher, in the same order and on the
// same views as sparsedge.model's forward paths do, so its logits are bit-identical to them (tests/test_fused_step.py);
// it only removes the interpreter. What the plan does not cover (other attention or FFN classes, windows, delta
// caches, hooks) stays on the Python path, which fused_step.plan_for decides.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace sparsedge::cpu {
at::Tensor embed_row(const at::Tensor& data, const std::string& qtype, int64_t K, int64_t token);  // quant_linear.cpp
namespace {

template <class Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

struct Ops {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, int64_t)> qlinear =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, int64_t)>("sparsedge::qlinear");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)> linear =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>("sparsedge::linear");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&)> linear_t =
      op<at::Tensor(const at::Tensor&, const at::Tensor&)>("sparsedge::linear_t");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double)> rms_norm =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("sparsedge::rms_norm");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)> rope =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("sparsedge::rope");
  c10::TypedOperatorHandle<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, double)> add_rms_norm =
      op<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, double)>("sparsedge::add_rms_norm");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double)>
      attention = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double)>(
          "sparsedge::dense_attention");
  using DeltaStep = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, const at::Tensor&,
                               at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                               int64_t, int64_t, int64_t, double);
  c10::TypedOperatorHandle<DeltaStep> delta_step = op<DeltaStep>("sparsedge::delta_step");
  using QSparse = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, c10::string_view,
                                                     const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, c10::string_view, double);
  c10::TypedOperatorHandle<QSparse> qsparse_ffn = op<QSparse>("sparsedge::qsparse_ffn");
  using Pair = std::tuple<at::Tensor, at::Tensor>;
  c10::TypedOperatorHandle<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>
      ffn_predict = op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "sparsedge::ffn_predict");
  using PredictQ4 = Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
                         double);
  c10::TypedOperatorHandle<PredictQ4> ffn_predict_q4 = op<PredictQ4>("sparsedge::ffn_predict_q4");
  using QRows = Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
                     const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, double);
  c10::TypedOperatorHandle<QRows> qsparse_ffn_rows = op<QRows>("sparsedge::qsparse_ffn_rows");
  using Rows = Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, c10::string_view, double, double);
  c10::TypedOperatorHandle<Rows> sparse_ffn_rows = op<Rows>("sparsedge::sparse_ffn_rows");
  using Sparse = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, c10::string_view, double, double);
  c10::TypedOperatorHandle<Sparse> sparse_ffn = op<Sparse>("sparsedge::sparse_ffn");
};

// a projection as sparsedge.model.linear runs it: qlinear (+ bias after) for block weights, linear(x, w, b) else
struct Proj {
  at::Tensor w, bias;
  std::string qtype;  // "" for a float weight
  int64_t K = 0;
  at::Tensor operator()(const Ops& o, const at::Tensor& x) const {
    if (qtype.empty()) return o.linear.call(x, w, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt);
    at::Tensor y = o.qlinear.call(x, w, qtype, K);
    return bias.defined() ? y + bias : y;
  }
};

// A DeltaLayerCache (sdk/sparsedge/delta/cache.py): its buffers (the same tensor objects; growth swaps their
// storage in place) and its host counters `state` = [length, encoded, used bound, first unrecorded step].
struct DeltaCache {
  at::Tensor ref, theta, values, chan, offsets, sink_k, window_k, v_cache, state;
  int64_t n_sink = 0, window = 0;
  double scale = 1.0;
  // The decode step the cache's own _step would take, when it would take it without growing: position `pos` is
  // next, past the sinks, the key leaving the window is the next to encode, and the bound says it fits.
  bool step_fits(int64_t pos, int64_t D) const {
    const int64_t* s = state.data_ptr<int64_t>();
    return s[0] == pos && pos >= n_sink && s[1] == pos - window && pos < v_cache.size(1) &&
           s[2] + D <= values.size(1);
  }
  // what _step does to the counters after the op
  void advance(int64_t pos, int64_t D) const {
    int64_t* s = state.data_ptr<int64_t>();
    s[0] = pos + 1, s[1] = pos - window + 1, s[2] += D;
    if (s[3] < 0) s[3] = pos;
  }
};

struct Layer {
  Proj qkv, o, gate_up, down;
  bool down_t = false;  // float W_downᵀ (linear_t) instead of a W_down projection
  at::Tensor ffn_norm, next_norm, k_cache, v_cache;
  double scale = 1.0;
  pybind11::object attend;  // a cache's attend(q, k, v, start) for caches other than the dense one (delta, windows)
  std::optional<DeltaCache> delta;  // a delta cache's decode step runs here when it fits (else attend grows it)
  // the pieces beyond Llama (sparsedge.model.ExtendedAttention and the general path); undefined when absent
  at::Tensor q_norm, k_norm, sub_norm, post_attn_norm, post_ffn_norm;
  bool local_rope = false;  // the sliding layers' own RoPE tables (Gemma 3)
  int64_t I = 0;
  std::string act;
  // DownSkipFFN on block weights: qsparse_ffn's inputs, and its int64 [tokens, kept] statistics counter
  bool skip = false;
  at::Tensor codes, dscale, dmin, thresh, counter;
  double act_param = 0.0;
  // a predictor FFN (sdk/sparsedge/ffn/module.py): the ops its `sparse` runs, by kind, on
  //   SvdQuant: ffn_predict(p = p1, p2, bias) + qsparse_ffn_rows(gate_up blocks, codes, dscale, dmin as above)
  //   Svd:      sparse_ffn(p = p1, p2, bias; w = w_gate, w_up, w_down_t)
  //   Q4:       ffn_predict_q4(p = q, scale, thresh) + sparse_ffn_rows(w = w_gate, w_up, w_down_t)
  // and its int64 [tokens, predicted, down rows] counter
  enum class Predictor { None, SvdQuant, Svd, Q4 } predictor = Predictor::None;
  at::Tensor p[3], w[3];
  double tau = 0.0;
};

// cache[:, pos] = x[0] for a [H, L, D] cache and x [1, H, D]: one memcpy per head where both are plain rows of the
// same dtype (what copy_ computes, without its TensorIterator: ~6 us a layer of serial time for two rows)
void write_row(const at::Tensor& cache, const at::Tensor& x, int64_t pos) {
  if (cache.dim() != 3 || x.dim() != 3 || x.size(0) != 1 || cache.scalar_type() != x.scalar_type() ||
      cache.stride(2) != 1 || x.stride(2) != 1 || x.size(1) != cache.size(0) || x.size(2) != cache.size(2)) {
    cache.slice(1, pos, pos + 1).copy_(x.transpose(0, 1));
    return;
  }
  const int64_t H = cache.size(0), D = cache.size(2), es = cache.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(cache.data_ptr()) + pos * cache.stride(1) * es;
  for (int64_t h = 0; h < H; ++h) std::memcpy(dst + h * cache.stride(0) * es, src + h * x.stride(1) * es, D * es);
}

class DecodePlan {
 public:
  DecodePlan(int64_t hq, int64_t hkv, int64_t head_dim, double eps) : hq_(hq), hkv_(hkv), d_(head_dim), eps_(eps) {}

  void add_attention(at::Tensor wqkv, std::string qkv_qtype, int64_t qkv_k, std::optional<at::Tensor> bqkv,
                     at::Tensor wo, std::string o_qtype, int64_t o_k, at::Tensor k_cache, at::Tensor v_cache,
                     double scale, at::Tensor ffn_norm, at::Tensor next_norm, pybind11::object attend) {
    Layer l;
    l.attend = attend;
    l.qkv = Proj{wqkv, bqkv.value_or(at::Tensor()), qkv_qtype, qkv_k};
    l.o = Proj{wo, at::Tensor(), o_qtype, o_k};
    l.k_cache = k_cache, l.v_cache = v_cache, l.scale = scale, l.ffn_norm = ffn_norm, l.next_norm = next_norm;
    layers_.push_back(std::move(l));
  }
  void set_extras(std::optional<at::Tensor> q_norm, std::optional<at::Tensor> k_norm, std::optional<at::Tensor> sub_norm,
                  std::optional<at::Tensor> post_attn_norm, std::optional<at::Tensor> post_ffn_norm, bool local_rope) {
    Layer& l = layers_.back();
    l.q_norm = q_norm.value_or(at::Tensor()), l.k_norm = k_norm.value_or(at::Tensor());
    l.sub_norm = sub_norm.value_or(at::Tensor());
    l.post_attn_norm = post_attn_norm.value_or(at::Tensor()), l.post_ffn_norm = post_ffn_norm.value_or(at::Tensor());
    l.local_rope = local_rope;
  }
  void set_delta(at::Tensor ref, at::Tensor theta, at::Tensor values, at::Tensor chan, at::Tensor offsets,
                 at::Tensor sink_k, at::Tensor window_k, at::Tensor v_cache, at::Tensor state, int64_t n_sink,
                 int64_t window, double scale) {
    TORCH_CHECK(state.scalar_type() == at::kLong && state.numel() == 4 && state.is_contiguous() && state.is_cpu(),
                "DecodePlan: a delta cache's state must be a contiguous int64 CPU tensor of 4 counters");
    layers_.back().delta = DeltaCache{ref, theta, values, chan, offsets, sink_k, window_k, v_cache, state,
                                      n_sink, window, scale};
  }
  void set_dense_ffn(at::Tensor w_gate_up, std::string gu_qtype, int64_t gu_k, at::Tensor w_down, std::string down_qtype,
                     int64_t down_k, bool down_t, int64_t I, std::string act) {
    Layer& l = layers_.back();
    l.gate_up = Proj{w_gate_up, at::Tensor(), gu_qtype, gu_k};
    l.down = Proj{w_down, at::Tensor(), down_qtype, down_k};
    l.down_t = down_t, l.I = I, l.act = act;
  }
  void set_skip_ffn(at::Tensor w_gate_up, std::string gu_qtype, at::Tensor codes, at::Tensor dscale, at::Tensor dmin,
                    at::Tensor thresh, std::string act, double act_param, at::Tensor counter) {
    TORCH_CHECK(counter.scalar_type() == at::kLong && counter.numel() == 2 && counter.is_contiguous());
    Layer& l = layers_.back();
    l.skip = true;
    l.gate_up = Proj{w_gate_up, at::Tensor(), gu_qtype, 0};
    l.codes = codes, l.dscale = dscale, l.dmin = dmin, l.thresh = thresh, l.act = act, l.act_param = act_param;
    l.counter = counter;
  }

  // kind "svd_q": w0..w3 = gate_up blocks, down codes, scale, min (qtype: the blocks'); "svd" / "q4": w0..w2 =
  // w_gate, w_up, w_down_t
  void set_predictor_ffn(std::string kind, at::Tensor p0, at::Tensor p1, at::Tensor p2, at::Tensor w0, at::Tensor w1,
                         at::Tensor w2, std::optional<at::Tensor> w3, std::string qtype, std::string act,
                         double act_param, double tau, at::Tensor counter) {
    TORCH_CHECK(counter.scalar_type() == at::kLong && counter.numel() == 3 && counter.is_contiguous());
    Layer& l = layers_.back();
    if (kind == "svd_q") {
      TORCH_CHECK(w3.has_value(), "DecodePlan: svd_q needs the down min tensor");
      l.predictor = Layer::Predictor::SvdQuant;
      l.gate_up = Proj{w0, at::Tensor(), qtype, 0};
      l.codes = w1, l.dscale = w2, l.dmin = *w3;
    } else {
      TORCH_CHECK(kind == "svd" || kind == "q4", "DecodePlan: unknown predictor FFN kind ", kind);
      l.predictor = kind == "svd" ? Layer::Predictor::Svd : Layer::Predictor::Q4;
      l.w[0] = w0, l.w[1] = w1, l.w[2] = w2;
    }
    l.p[0] = p0, l.p[1] = p1, l.p[2] = p2;
    l.act = act, l.act_param = act_param, l.tau = tau, l.counter = counter;
  }

  // h: the first layer's normed input [1, dim]; residual [1, dim] (updated in place); cos/sin: the model's tables.
  // Returns the last layer's output after the final norm.
  at::Tensor run(at::Tensor h, at::Tensor residual, const at::Tensor& cos_t, const at::Tensor& sin_t,
                 const std::optional<at::Tensor>& cos_local_t, const std::optional<at::Tensor>& sin_local_t,
                 int64_t start) {
    const Ops& o = ops();
    const at::Tensor cos_g = cos_t.slice(0, start, start + 1), sin_g = sin_t.slice(0, start, start + 1);
    const at::Tensor cos_l = cos_local_t ? cos_local_t->slice(0, start, start + 1) : cos_g;
    const at::Tensor sin_l = sin_local_t ? sin_local_t->slice(0, start, start + 1) : sin_g;
    const int64_t qs = hq_ * d_, kvs = hkv_ * d_;
    for (Layer& l : layers_) {
      const at::Tensor& cos = l.local_rope ? cos_l : cos_g;
      const at::Tensor& sin = l.local_rope ? sin_l : sin_g;
      const at::Tensor qkv = l.qkv(o, h);
      at::Tensor qk;
      if (l.q_norm.defined()) {  // per-head RMSNorm of q and k before RoPE (ExtendedAttention)
        const at::Tensor q = o.rms_norm.call(qkv.slice(1, 0, qs).reshape({1, hq_, d_}), l.q_norm, eps_);
        const at::Tensor k = o.rms_norm.call(qkv.slice(1, qs, qs + kvs).reshape({1, hkv_, d_}), l.k_norm, eps_);
        qk = o.rope.call(at::cat({q, k}, 1), cos, sin);
      } else {
        qk = o.rope.call(qkv.slice(1, 0, qs + kvs).reshape({1, hq_ + hkv_, d_}), cos, sin);
      }
      const at::Tensor q = qk.slice(1, 0, hq_), k = qk.slice(1, hq_);
      const at::Tensor v = qkv.slice(1, qs + kvs).reshape({1, hkv_, d_});
      at::Tensor out;
      if (l.delta && l.delta->step_fits(start, d_)) {
        DeltaCache& c = *l.delta;
        out = o.delta_step.call(q, k, v, c.ref, c.theta, c.values, c.chan, c.offsets, c.sink_k, c.window_k, c.v_cache,
                                start, c.n_sink, c.window, c.scale);
        c.advance(start, d_);
      } else if (!l.attend.is_none()) {  // the cache's own attend (its bookkeeping stays in Python)
        out = l.attend(q, k, v, start).cast<at::Tensor>();
      } else {
        write_row(l.k_cache, k, start);
        write_row(l.v_cache, v, start);
        out = o.attention.call(q, l.k_cache, l.v_cache, start, l.scale);
      }
      at::Tensor flat = out.reshape({1, qs});
      if (l.sub_norm.defined()) flat = o.rms_norm.call(flat, l.sub_norm, eps_);
      at::Tensor a = l.o(o, flat);
      if (l.post_attn_norm.defined()) a = o.rms_norm.call(a, l.post_attn_norm, eps_);
      h = o.add_rms_norm.call(residual, a, l.ffn_norm, eps_);
      at::Tensor f;
      if (l.predictor != Layer::Predictor::None) {
        at::Tensor idx, count, down_count;
        switch (l.predictor) {
          case Layer::Predictor::Svd:
            std::tie(f, count, down_count) = o.sparse_ffn.call(h, l.p[0], l.p[1], l.p[2], l.w[0], l.w[1], l.w[2],
                                                               l.act, l.act_param, l.tau);
            break;
          case Layer::Predictor::SvdQuant:
            std::tie(idx, count) = o.ffn_predict.call(h, l.p[0], l.p[1], l.p[2]);
            std::tie(f, down_count) = o.qsparse_ffn_rows.call(h, idx, count, l.gate_up.w, l.gate_up.qtype, l.codes,
                                                              l.dscale, l.dmin, l.act, l.act_param);
            break;
          default:  // Q4
            std::tie(idx, count) = o.ffn_predict_q4.call(h, l.p[0], l.p[1], l.p[2], l.act, l.act_param);
            std::tie(f, down_count) = o.sparse_ffn_rows.call(h, idx, count, l.w[0], l.w[1], l.w[2], l.act,
                                                             l.act_param, 0.0);
        }
        int64_t* c = l.counter.data_ptr<int64_t>();
        c[0] += 1;
        c[1] += count.data_ptr<int32_t>()[0];
        c[2] += down_count.data_ptr<int32_t>()[0];
      } else if (l.skip) {
        auto [y, kept] = o.qsparse_ffn.call(h, l.gate_up.w, l.gate_up.qtype, l.codes, l.dscale, l.dmin, l.thresh,
                                            l.act, l.act_param);
        int64_t* c = l.counter.data_ptr<int64_t>();
        c[0] += 1;
        c[1] += kept.data_ptr<int32_t>()[0];
        f = y;
      } else {
        const at::Tensor gu = l.gate_up(o, h);
        const at::Tensor g = gu.slice(1, 0, l.I), u = gu.slice(1, l.I);
        at::Tensor hh;
        // act(g) * u with the product in place: the same elementwise operations as sparsedge.model's
        // F.silu(g) * u, one allocation fewer
        if (l.act == "silu") hh = at::silu(g).mul_(u);
        else hh = at::gelu(g, l.act == "gelu_tanh" ? "tanh" : "none").mul_(u);
        f = l.down_t ? o.linear_t.call(hh, l.down.w) : l.down(o, hh);
      }
      if (l.post_ffn_norm.defined()) f = o.rms_norm.call(f, l.post_ffn_norm, eps_);
      h = o.add_rms_norm.call(residual, f, l.next_norm, eps_);
    }
    return h;
  }

 private:
  static const Ops& ops() {
    static const Ops o;  // looked up once, after sparsedge.ops defined the schema
    return o;
  }
  std::vector<Layer> layers_;
  int64_t hq_, hkv_, d_;
  double eps_;
};

}  // namespace

void register_decode_loop(pybind11::module& m) {
  pybind11::class_<DecodePlan>(m, "DecodePlan")
      .def(pybind11::init<int64_t, int64_t, int64_t, double>())
      .def("add_attention", &DecodePlan::add_attention)
      .def("set_extras", &DecodePlan::set_extras)
      .def("set_delta", &DecodePlan::set_delta)
      .def("set_dense_ffn", &DecodePlan::set_dense_ffn)
      .def("set_skip_ffn", &DecodePlan::set_skip_ffn)
      .def("set_predictor_ffn", &DecodePlan::set_predictor_ffn)
      .def("run", &DecodePlan::run);
  m.def("embed_row", &embed_row, "row `token` of a q8_0 / q4_0 embedding table, dequantized (undefined: other formats)");
}

}  // namespace sparsedge::cpu
