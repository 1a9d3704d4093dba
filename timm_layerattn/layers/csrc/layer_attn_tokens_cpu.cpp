// Fused CPU inference kernels for layer attention on a vision transformer's token grid (float32,
// contiguous [B, P + H * W, C] tokens: P prefix tokens, then the patch grid in row-major order).
//
// On tokens the branch is a dozen full-size passes in PyTorch: the LayerNorm of the block output, a
// depth-wise conv (oneDNN, on a channels-last view), the GELU, the LayerNorm of the block input, the
// products and sums, the concatenation with the prefix tokens and the residual add. Here a block's branch
// is two passes: the LayerNorm of every token into a buffer (the conv reads neighbours, so the normalised
// grid must exist whole before the second pass), and one pass per token that convolves its 3 x 3
// neighbourhood channel by channel (channels are contiguous, so the loops vectorise over C), applies the
// gate or the softmax weights, and writes the block's new tokens. The per-sample maths (pooling, ECA query
// and key, gates, softmax) runs between the two passes, as in layer_attn_cpu.cpp.
//
// Built with the other kernels by timm_layerattn/layers/native.py; the modules in
// timm_layerattn/layers/vit_la.py compute the same results with PyTorch ops in every other case, and
// tests/test_deit_la.py checks both paths against each other.

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "plane.h"

using namespace layer_attn;

namespace {

// The checks both ops share: token layout, grid, LayerNorm and ECA weights.
void check_tokens(const at::Tensor& x, int64_t num_prefix, int64_t grid_h, int64_t grid_w,
                  const at::Tensor& norm_weight, const at::Tensor& norm_bias, const at::Tensor& v_weight,
                  const at::Tensor& q_weight, const at::Tensor& k_weight, int64_t head_dim) {
  TORCH_CHECK(x.dim() == 3, "x must be a 3-D [B, N, C] token tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "x must be a float32 CPU tensor");
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  TORCH_CHECK(num_prefix >= 0 && grid_h > 0 && grid_w > 0 && x.size(1) == num_prefix + grid_h * grid_w,
              "x has ", x.size(1), " tokens, expected ", num_prefix, " prefix tokens + a ", grid_h, " x ", grid_w,
              " grid");
  const int64_t C = x.size(2);
  check_vec(norm_weight, {C}, "norm_weight");
  check_vec(norm_bias, {C}, "norm_bias");
  check_vec(v_weight, {C, 1, 3, 3}, "v_weight");
  TORCH_CHECK(q_weight.dim() == 3 && q_weight.size(0) == 1 && q_weight.size(1) == 1 && q_weight.size(2) % 2 == 1,
              "q_weight must have shape [1, 1, k] with odd k, got ", q_weight.sizes());
  check_vec(q_weight, q_weight.sizes(), "q_weight");
  check_vec(k_weight, q_weight.sizes(), "k_weight");
  TORCH_CHECK(head_dim > 0 && C % head_dim == 0, "head_dim (", head_dim, ") must divide the channels (", C, ")");
}

// LayerNorm of one token's C channels (biased variance, as PyTorch), two passes over values held in L1.
inline void layer_norm_row(const float* x, const float* w, const float* b, float eps, int64_t C, float* out) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < C; ++c) sum += x[c];
  const float mean = sum / static_cast<float>(C);
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t c = 0; c < C; ++c) sq += (x[c] - mean) * (x[c] - mean);
  const float rstd = 1.f / std::sqrt(sq / static_cast<float>(C) + eps);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) out[c] = (x[c] - mean) * rstd * w[c] + b[c];
}

// LayerNorm of every token of x into y ([B, N, C] each), in parallel over tokens.
void layer_norm_tokens(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps, at::Tensor& y) {
  const int64_t rows = x.size(0) * x.size(1), C = x.size(2);
  const float* X = x.const_data_ptr<float>();
  const float* Wn = w.const_data_ptr<float>();
  const float* Bn = b.const_data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(C, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) layer_norm_row(X + r * C, Wn, Bn, static_cast<float>(eps), C, Y + r * C);
  });
}

// Mean over the patch tokens of y, per (sample, channel): [B * C], accumulated in double.
std::vector<float> grid_means(const at::Tensor& y, int64_t num_prefix) {
  const int64_t B = y.size(0), N = y.size(1), C = y.size(2), hw = N - num_prefix;
  const float* Y = y.const_data_ptr<float>();
  std::vector<float> means(B * C);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> acc(C);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(acc.begin(), acc.end(), 0.);
      for (int64_t n = num_prefix; n < N; ++n) {
        const float* row = Y + (b * N + n) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) acc[c] += row[c];
      }
      for (int64_t c = 0; c < C; ++c) means[b * C + c] = static_cast<float>(acc[c] / static_cast<double>(hw));
    }
  });
  return means;
}

// The depth-wise 3 x 3 weights tap-major ([9][C]), so a token's conv reads both operands along C.
std::vector<float> taps_by_channel(const at::Tensor& v_weight) {
  const int64_t C = v_weight.size(0);
  const float* K = v_weight.const_data_ptr<float>();
  std::vector<float> t(9 * C);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < 9; ++j) t[j * C + c] = K[c * 9 + j];
  return t;
}

// Depth-wise 3 x 3 (zero padding 1) at patch (h, w) of sample b's normalised grid `y_b` (the grid's first
// token), for all channels: out[c] = sum over in-grid neighbours of taps[j][c] * y[neighbour][c].
inline void dw3x3_token(const float* y_b, const float* taps, int64_t h, int64_t w, int64_t H, int64_t W, int64_t C,
                        float* out) {
  std::fill(out, out + C, 0.f);
  for (int64_t dh = -1; dh <= 1; ++dh) {
    const int64_t hh = h + dh;
    if (hh < 0 || hh >= H) continue;
    for (int64_t dw = -1; dw <= 1; ++dw) {
      const int64_t ww = w + dw;
      if (ww < 0 || ww >= W) continue;
      const float* src = y_b + (hh * W + ww) * C;
      const float* k = taps + ((dh + 1) * 3 + (dw + 1)) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) out[c] += k[c] * src[c];
    }
  }
}

// erf as a rational function of x on [-4, 4] (clamped: erf is +-1 in float32 beyond), odd numerator of
// degree 13 over an even denominator of degree 8; within 5e-7 of float32 erf. Only arithmetic, so loops over
// it vectorise (std::erf would not).
inline float erf_rational(float x) {
  x = std::min(4.f, std::max(-4.f, x));
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

// The exact (erf) GELU, PyTorch's default.
inline float gelu(float v) { return 0.5f * v * (1.f + erf_rational(v * 0.70710678118654752f)); }

// Prefix tokens of the output: x, plus LN(x) when the branch writes the prefix slots (prefix_norm).
inline void prefix_row(const float* x, const float* y, bool prefix_norm, int64_t C, float* out) {
  if (prefix_norm) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] = x[c] + y[c];
  } else {
    std::memcpy(out, x, C * sizeof(float));
  }
}

// Runs `token(b, n, scratch)` for every token in parallel, with C floats of per-thread scratch per slot.
template <typename TokenFn>
void for_each_token(int64_t B, int64_t N, int64_t C, int64_t slots, const TokenFn& token) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1));
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(slots * C);
    for (int64_t r = begin; r < end; ++r) token(r / N, r % N, scratch.data());
  });
}

}  // namespace

// MRLA-light on tokens, inference. With y = LN_x(x), z = LN_o(shortcut), Y the patch grid of y:
//   gate[b, h] = sigmoid(<Q_h, K_h> * attn_scale),   Q, K = ECA convs of GAP(Y)
//   out_patch  = x + gate * GELU(DW3(Y)) + lambda * z
//   out_prefix = x + y (prefix_norm) or x
at::Tensor mrla_light_tokens(const at::Tensor& x, const at::Tensor& shortcut, const at::Tensor& norm_weight,
                             const at::Tensor& norm_bias, double norm_eps, const at::Tensor& prev_weight,
                             const at::Tensor& prev_bias, double prev_eps, const at::Tensor& v_weight,
                             const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& lambda_t,
                             int64_t num_prefix, int64_t grid_h, int64_t grid_w, int64_t head_dim, double attn_scale,
                             bool prefix_norm) {
  check_tokens(x, num_prefix, grid_h, grid_w, norm_weight, norm_bias, v_weight, q_weight, k_weight, head_dim);
  TORCH_CHECK(shortcut.sizes() == x.sizes() && shortcut.is_contiguous() && shortcut.scalar_type() == at::kFloat &&
              shortcut.device().is_cpu(), "shortcut must be a contiguous float32 CPU tensor shaped like x");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  check_vec(prev_weight, {C}, "prev_weight");
  check_vec(prev_bias, {C}, "prev_bias");
  check_vec(lambda_t, {C}, "lambda_t");
  at::Tensor y = at::empty_like(x);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  layer_norm_tokens(x, norm_weight, norm_bias, norm_eps, y);

  const std::vector<float> pooled = grid_means(y, num_prefix);
  const std::vector<float> gate = light_gates(pooled, B, C, q_weight, k_weight, head_dim, attn_scale, nullptr);

  const std::vector<float> taps = taps_by_channel(v_weight);
  const float* X = x.const_data_ptr<float>();
  const float* S = shortcut.const_data_ptr<float>();
  const float* Y = y.const_data_ptr<float>();
  const float* PW = prev_weight.const_data_ptr<float>();
  const float* PB = prev_bias.const_data_ptr<float>();
  const float* L = lambda_t.const_data_ptr<float>();
  float* O = out.data_ptr<float>();
  for_each_token(B, N, C, 2, [&](int64_t b, int64_t n, float* scratch) {
    const int64_t r = (b * N + n) * C;
    if (n < num_prefix) {
      prefix_row(X + r, Y + r, prefix_norm, C, O + r);
      return;
    }
    float* conv = scratch;
    float* z = scratch + C;
    const int64_t i = n - num_prefix;
    dw3x3_token(Y + (b * N + num_prefix) * C, taps.data(), i / grid_w, i % grid_w, grid_h, grid_w, C, conv);
    layer_norm_row(S + r, PW, PB, static_cast<float>(prev_eps), C, z);
    const float* g = gate.data() + b * C;
    const float* x_r = X + r;
    float* o_r = O + r;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o_r[c] = x_r[c] + g[c] * gelu(conv[c]) + L[c] * z[c];
  });
  return out;
}

// MRLA-base on tokens, inference. With y = LN(x), Y its patch grid, the cache's earlier keys (`keys`,
// [B, T-1, C]; none after a reset) and values V_0..V_{T-2} (`values`, [B, H, W, C] each):
//   keys' = [keys, K_t]                                   (returned, [B, T, C])
//   w[b, j, h] = softmax_j(<Q_h, K'_{j,h}> * attn_scale),  Q, K_t = ECA convs of GAP(Y)
//   V_{T-1} = DW3(Y)                                      (returned, [B, H, W, C])
//   out_patch  = x + sum_j w_j * V_j
//   out_prefix = x + y (prefix_norm) or x
std::tuple<at::Tensor, at::Tensor, at::Tensor> mrla_base_tokens(
    const at::Tensor& x, at::TensorList values, const c10::optional<at::Tensor>& keys, const at::Tensor& norm_weight,
    const at::Tensor& norm_bias, double norm_eps, const at::Tensor& v_weight, const at::Tensor& q_weight,
    const at::Tensor& k_weight, int64_t num_prefix, int64_t grid_h, int64_t grid_w, int64_t head_dim,
    double attn_scale, bool prefix_norm) {
  check_tokens(x, num_prefix, grid_h, grid_w, norm_weight, norm_bias, v_weight, q_weight, k_weight, head_dim);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), hw = grid_h * grid_w;
  const int64_t T = static_cast<int64_t>(values.size()) + 1;
  TORCH_CHECK(keys.has_value() == (T > 1), "keys must be given exactly when there are earlier values");
  if (keys) check_vec(*keys, {B, T - 1, C}, "keys");
  for (const auto& v : values) check_vec(v, {B, grid_h, grid_w, C}, "values[j]");
  at::Tensor y = at::empty_like(x);
  at::Tensor out = at::empty_like(x);
  at::Tensor value = at::empty({B, grid_h, grid_w, C}, x.options());
  at::Tensor keys_new = at::empty({B, T, C}, x.options());
  if (x.numel() == 0) return {out, value, keys_new};
  layer_norm_tokens(x, norm_weight, norm_bias, norm_eps, y);

  const std::vector<float> pooled = grid_means(y, num_prefix);
  const std::vector<float> weights =
      cache_weights(pooled, B, T, C, keys ? keys->const_data_ptr<float>() : nullptr, keys_new.data_ptr<float>(),
                    q_weight, k_weight, head_dim, attn_scale, nullptr);

  std::vector<const float*> earlier;
  for (const auto& v : values) earlier.push_back(v.const_data_ptr<float>());
  const std::vector<float> taps = taps_by_channel(v_weight);
  const float* X = x.const_data_ptr<float>();
  const float* Y = y.const_data_ptr<float>();
  float* V = value.data_ptr<float>();
  float* O = out.data_ptr<float>();
  for_each_token(B, N, C, 0, [&](int64_t b, int64_t n, float*) {
    const int64_t r = (b * N + n) * C;
    if (n < num_prefix) {
      prefix_row(X + r, Y + r, prefix_norm, C, O + r);
      return;
    }
    const int64_t i = n - num_prefix, v_r = (b * hw + i) * C;
    float* v = V + v_r;
    dw3x3_token(Y + (b * N + num_prefix) * C, taps.data(), i / grid_w, i % grid_w, grid_h, grid_w, C, v);
    const float* w_t = weights.data() + (b * T + T - 1) * C;
    const float* x_r = X + r;
    float* o_r = O + r;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o_r[c] = x_r[c] + w_t[c] * v[c];
    for (int64_t j = 0; j + 1 < T; ++j) {
      const float* e = earlier[j] + v_r;
      const float* w_j = weights.data() + (b * T + j) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o_r[c] += w_j[c] * e[c];
    }
  });
  return {out, value, keys_new};
}

TORCH_LIBRARY_FRAGMENT(timm_layerattn, m) {
  m.def("mrla_light_tokens(Tensor x, Tensor shortcut, Tensor norm_weight, Tensor norm_bias, float norm_eps, "
        "Tensor prev_weight, Tensor prev_bias, float prev_eps, Tensor v_weight, Tensor q_weight, Tensor k_weight, "
        "Tensor lambda_t, int num_prefix, int grid_h, int grid_w, int head_dim, float attn_scale, "
        "bool prefix_norm) -> Tensor");
  m.def("mrla_base_tokens(Tensor x, Tensor[] values, Tensor? keys, Tensor norm_weight, Tensor norm_bias, "
        "float norm_eps, Tensor v_weight, Tensor q_weight, Tensor k_weight, int num_prefix, int grid_h, "
        "int grid_w, int head_dim, float attn_scale, bool prefix_norm) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(timm_layerattn, CPU, m) {
  m.impl("mrla_light_tokens", mrla_light_tokens);
  m.impl("mrla_base_tokens", mrla_base_tokens);
}
