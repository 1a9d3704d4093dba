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
// For training, `token_dwconv` / `token_dwconv_backward` are the value's depth-wise conv (and GELU) alone, and
// `token_cache_sum` / `token_cache_sum_backward` MRLA-base's weighted sum over the cached values, on the same
// token layout, for the autograd Functions `TokenConv` and `TokenCacheSum` of vit_la.py.
//
// Built with the other kernels by timm_layerattn/layers/native.py; the modules in
// timm_layerattn/layers/vit_la.py compute the same results with PyTorch ops in every other case, and
// tests/test_deit_la.py checks both paths against each other.

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "plane.h"

using namespace layer_attn;

namespace {

// A contiguous float32 CPU [B, P + H * W, C] token tensor with P = num_prefix and an H x W grid.
void check_grid_tokens(const at::Tensor& x, int64_t num_prefix, int64_t grid_h, int64_t grid_w, const char* name) {
  TORCH_CHECK(x.dim() == 3, name, " must be a 3-D [B, N, C] token tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(num_prefix >= 0 && grid_h > 0 && grid_w > 0 && x.size(1) == num_prefix + grid_h * grid_w,
              name, " has ", x.size(1), " tokens, expected ", num_prefix, " prefix tokens + a ", grid_h, " x ",
              grid_w, " grid");
}

// The checks the inference ops share: token layout, grid, LayerNorm and ECA weights.
void check_tokens(const at::Tensor& x, int64_t num_prefix, int64_t grid_h, int64_t grid_w,
                  const at::Tensor& norm_weight, const at::Tensor& norm_bias, const at::Tensor& v_weight,
                  const at::Tensor& q_weight, const at::Tensor& k_weight, int64_t head_dim) {
  check_grid_tokens(x, num_prefix, grid_h, grid_w, "x");
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

// Calls fn(tap, n) for each in-grid neighbour n (row-major index) of patch (h, w) of an H x W grid, with tap
// the 3 x 3 kernel position (row-major, 4 the centre) that reads it.
template <typename Fn>
inline void for_each_neighbour(int64_t h, int64_t w, int64_t H, int64_t W, const Fn& fn) {
  for (int64_t dh = -1; dh <= 1; ++dh) {
    const int64_t hh = h + dh;
    if (hh < 0 || hh >= H) continue;
    for (int64_t dw = -1; dw <= 1; ++dw) {
      const int64_t ww = w + dw;
      if (ww >= 0 && ww < W) fn((dh + 1) * 3 + (dw + 1), hh * W + ww);
    }
  }
}

// Depth-wise 3 x 3 (zero padding 1) at patch (h, w) of sample b's normalised grid `y_b` (the grid's first
// token), for all channels: out[c] = sum over in-grid neighbours of taps[j][c] * y[neighbour][c].
inline void dw3x3_token(const float* y_b, const float* taps, int64_t h, int64_t w, int64_t H, int64_t W, int64_t C,
                        float* out) {
  std::fill(out, out + C, 0.f);
  for_each_neighbour(h, w, H, W, [&](int64_t tap, int64_t n) {
    const float* src = y_b + n * C;
    const float* k = taps + tap * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] += k[c] * src[c];
  });
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

// exp(x) with only arithmetic and a bit cast (so loops over it vectorise): 2^n * p(r), r = x - n ln 2 in
// [-ln2/2, ln2/2], p Cephes' degree-7 polynomial; within a few ulp of float32 exp on [-87, 88], clamped outside.
inline float exp_poly(float x) {
  x = std::min(88.f, std::max(-87.f, x));
  const float t = std::fma(x, 1.44269504088896341f, 0.5f);
  const int32_t ni = static_cast<int32_t>(t) - (t < 0.f ? 1 : 0);  // floor(t); std::floor would not vectorise
  const float n = static_cast<float>(ni);
  const float r = std::fma(n, -0.693145751953125f, std::fma(n, -1.428606765330187e-06f, x));
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.f;
  return p * __builtin_bit_cast(float, (ni + 127) << 23);
}

// d GELU / d v = Phi(v) + v * phi(v), with Phi from the same rational erf as `gelu`.
inline float gelu_grad(float v) {
  const float cdf = 0.5f * (1.f + erf_rational(v * 0.70710678118654752f));
  return cdf + v * 0.39894228040143268f * exp_poly(-0.5f * v * v);
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

// The depth-wise 3 x 3 conv (zero padding 1) of the patch grid of tokens y ([B, P + H * W, C]), optionally
// followed by GELU, for training: out [B, H * W, C] in token order (the grid's channels-last layout).
at::Tensor token_dwconv(const at::Tensor& y, const at::Tensor& v_weight, int64_t num_prefix, int64_t grid_h,
                        int64_t grid_w, bool gelu_out) {
  check_grid_tokens(y, num_prefix, grid_h, grid_w, "y");
  const int64_t B = y.size(0), N = y.size(1), C = y.size(2), hw = grid_h * grid_w;
  check_vec(v_weight, {C, 1, 3, 3}, "v_weight");
  at::Tensor out = at::empty({B, hw, C}, y.options());
  if (out.numel() == 0) return out;
  const std::vector<float> taps = taps_by_channel(v_weight);
  const float* Y = y.const_data_ptr<float>();
  float* O = out.data_ptr<float>();
  for_each_token(B, hw, C, 0, [&](int64_t b, int64_t i, float*) {
    float* o = O + (b * hw + i) * C;
    dw3x3_token(Y + (b * N + num_prefix) * C, taps.data(), i / grid_w, i % grid_w, grid_h, grid_w, C, o);
    if (gelu_out) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] = gelu(o[c]);
    }
  });
  return out;
}

// Backward of `token_dwconv`: with u = DW3(grid(y)) and g = grad * GELU'(u) (or grad without GELU),
//   d y (grid tokens) = DW3 with the taps rotated by 180 degrees of g,   d y (prefix tokens) = 0,
//   d weight[c, tap] = sum over samples and tokens of g * the tap's neighbour of y.
// u is recomputed token by token; the weight gradient's per-row partial sums are reduced in a fixed order, so the
// result does not depend on the thread count.
std::tuple<at::Tensor, at::Tensor> token_dwconv_backward(const at::Tensor& grad, const at::Tensor& y,
                                                         const at::Tensor& v_weight, int64_t num_prefix,
                                                         int64_t grid_h, int64_t grid_w, bool gelu_out) {
  check_grid_tokens(y, num_prefix, grid_h, grid_w, "y");
  const int64_t B = y.size(0), N = y.size(1), C = y.size(2), hw = grid_h * grid_w;
  check_vec(v_weight, {C, 1, 3, 3}, "v_weight");
  check_vec(grad, {B, hw, C}, "grad");
  at::Tensor g_y = at::empty_like(y);  // the grid rows are written below, the prefix rows are zero
  at::Tensor g_w = at::zeros({C, 1, 3, 3}, y.options());
  if (g_y.numel() == 0) return {g_y, g_w};
  float* GY = g_y.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) std::fill(GY + b * N * C, GY + (b * N + num_prefix) * C, 0.f);
  const std::vector<float> taps = taps_by_channel(v_weight);
  std::vector<float> rot(9 * C);
  for (int64_t j = 0; j < 9; ++j) std::memcpy(rot.data() + j * C, taps.data() + (8 - j) * C, C * sizeof(float));
  const float* Y = y.const_data_ptr<float>();
  const float* G = grad.const_data_ptr<float>();
  // pass 1: g (the conv output's gradient) into a buffer, and the weight gradient's partial sums per grid row
  at::Tensor g_conv = gelu_out ? at::empty({B, hw, C}, y.options()) : grad;
  float* GC = gelu_out ? g_conv.data_ptr<float>() : nullptr;
  const int64_t rows = B * grid_h;
  std::vector<double> dk(rows * 9 * C, 0.);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> u(C), acc(9 * C);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / grid_h, h = row % grid_h;
      const float* y_b = Y + (b * N + num_prefix) * C;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t w = 0; w < grid_w; ++w) {
        const int64_t i = h * grid_w + w;
        const float* g_in = G + (b * hw + i) * C;
        const float* g_i = g_in;
        if (gelu_out) {
          dw3x3_token(y_b, taps.data(), h, w, grid_h, grid_w, C, u.data());
          float* gc = GC + (b * hw + i) * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gc[c] = g_in[c] * gelu_grad(u[c]);
          g_i = gc;
        }
        for_each_neighbour(h, w, grid_h, grid_w, [&](int64_t tap, int64_t n) {
          const float* src = y_b + n * C;
          float* a = acc.data() + tap * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) a[c] += g_i[c] * src[c];
        });
      }
      double* d = dk.data() + row * 9 * C;  // float sums over one row (at most grid_w terms), then double
      for (int64_t k = 0; k < 9 * C; ++k) d[k] = acc[k];
    }
  });
  // pass 2: d y of every grid token, the transposed conv of g
  const float* GS = gelu_out ? GC : G;
  for_each_token(B, hw, C, 0, [&](int64_t b, int64_t i, float*) {
    dw3x3_token(GS + b * hw * C, rot.data(), i / grid_w, i % grid_w, grid_h, grid_w, C, GY + (b * N + num_prefix + i) * C);
  });
  float* W = g_w.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < 9; ++j) {
      double t = 0.;
      for (int64_t row = 0; row < rows; ++row) t += dk[(row * 9 + j) * C + c];
      W[c * 9 + j] = static_cast<float>(t);
    }
  return {g_y, g_w};
}

// MRLA-base's weighted sum over the cache, for training: out[b, i, c] = sum_j weights[b, j, c] * V_j[b, i, c]
// ([B, H * W, C] tokens), with weights [B, T, C] and the T cached values V_j [B, H, W, C] (channels-last
// buffers, as the token grid's conv writes them).
static void check_cache(const at::Tensor& weights, at::TensorList values) {
  TORCH_CHECK(!values.empty(), "values must not be empty");
  const int64_t T = static_cast<int64_t>(values.size());
  TORCH_CHECK(values[0].dim() == 4, "values[0] must be a 4-D [B, H, W, C] map, got ", values[0].dim(), "-D");
  const int64_t B = values[0].size(0), C = values[0].size(3);
  check_vec(weights, {B, T, C}, "weights");
  for (const auto& v : values) check_vec(v, values[0].sizes(), "values[j]");
}

at::Tensor token_cache_sum(const at::Tensor& weights, at::TensorList values) {
  check_cache(weights, values);
  const int64_t T = static_cast<int64_t>(values.size()), B = values[0].size(0), C = values[0].size(3);
  const int64_t hw = values[0].size(1) * values[0].size(2);
  at::Tensor out = at::empty({B, hw, C}, weights.options());
  if (out.numel() == 0) return out;
  std::vector<const float*> V;
  for (const auto& v : values) V.push_back(v.const_data_ptr<float>());
  const float* Wt = weights.const_data_ptr<float>();
  float* O = out.data_ptr<float>();
  for_each_token(B, hw, C, 0, [&](int64_t b, int64_t i, float*) {
    const int64_t r = (b * hw + i) * C;
    float* o = O + r;
    const float* w0 = Wt + b * T * C;
    const float* v0 = V[0] + r;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = w0[c] * v0[c];
    for (int64_t j = 1; j < T; ++j) {
      const float* w = Wt + (b * T + j) * C;
      const float* v = V[j] + r;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] += w[c] * v[c];
    }
  });
  return out;
}

// Backward of `token_cache_sum`: d V_j = weights_j * grad, d weights[b, j, c] = sum_i grad[b, i, c] * V_j[b, i, c]
// (float sums over at most 64 tokens, then double), one (sample, value) pair per task.
std::tuple<at::Tensor, std::vector<at::Tensor>> token_cache_sum_backward(const at::Tensor& grad,
                                                                          const at::Tensor& weights,
                                                                          at::TensorList values) {
  check_cache(weights, values);
  const int64_t T = static_cast<int64_t>(values.size()), B = values[0].size(0), C = values[0].size(3);
  const int64_t hw = values[0].size(1) * values[0].size(2);
  check_vec(grad, {B, hw, C}, "grad");
  at::Tensor g_w = at::empty_like(weights);
  std::vector<at::Tensor> g_v;
  for (const auto& v : values) g_v.push_back(at::empty_like(v));
  std::vector<const float*> V;
  std::vector<float*> GV;
  for (int64_t j = 0; j < T; ++j) {
    V.push_back(values[j].const_data_ptr<float>());
    GV.push_back(g_v[j].data_ptr<float>());
  }
  const float* G = grad.const_data_ptr<float>();
  const float* Wt = weights.const_data_ptr<float>();
  float* GW = g_w.data_ptr<float>();
  at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(C);
    std::vector<double> sum(C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / T, j = task % T;
      const float* w = Wt + (b * T + j) * C;
      std::fill(sum.begin(), sum.end(), 0.);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i = 0; i < hw; ++i) {
        const int64_t r = (b * hw + i) * C;
        const float* g = G + r;
        const float* v = V[j] + r;
        float* gv = GV[j] + r;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          gv[c] = w[c] * g[c];
          acc[c] += g[c] * v[c];
        }
        if ((i + 1) % 64 == 0 || i + 1 == hw) {
          for (int64_t c = 0; c < C; ++c) sum[c] += acc[c];
          std::fill(acc.begin(), acc.end(), 0.f);
        }
      }
      float* gw = GW + (b * T + j) * C;
      for (int64_t c = 0; c < C; ++c) gw[c] = static_cast<float>(sum[c]);
    }
  });
  return {g_w, g_v};
}

TORCH_LIBRARY_FRAGMENT(timm_layerattn, m) {
  m.def("mrla_light_tokens(Tensor x, Tensor shortcut, Tensor norm_weight, Tensor norm_bias, float norm_eps, "
        "Tensor prev_weight, Tensor prev_bias, float prev_eps, Tensor v_weight, Tensor q_weight, Tensor k_weight, "
        "Tensor lambda_t, int num_prefix, int grid_h, int grid_w, int head_dim, float attn_scale, "
        "bool prefix_norm) -> Tensor");
  m.def("mrla_base_tokens(Tensor x, Tensor[] values, Tensor? keys, Tensor norm_weight, Tensor norm_bias, "
        "float norm_eps, Tensor v_weight, Tensor q_weight, Tensor k_weight, int num_prefix, int grid_h, "
        "int grid_w, int head_dim, float attn_scale, bool prefix_norm) -> (Tensor, Tensor, Tensor)");
  m.def("token_dwconv(Tensor y, Tensor v_weight, int num_prefix, int grid_h, int grid_w, bool gelu) -> Tensor");
  m.def("token_dwconv_backward(Tensor grad, Tensor y, Tensor v_weight, int num_prefix, int grid_h, int grid_w, "
        "bool gelu) -> (Tensor, Tensor)");
  m.def("token_cache_sum(Tensor weights, Tensor[] values) -> Tensor");
  m.def("token_cache_sum_backward(Tensor grad, Tensor weights, Tensor[] values) -> (Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(timm_layerattn, CPU, m) {
  m.impl("mrla_light_tokens", mrla_light_tokens);
  m.impl("mrla_base_tokens", mrla_base_tokens);
  m.impl("token_dwconv", token_dwconv);
  m.impl("token_dwconv_backward", token_dwconv_backward);
  m.impl("token_cache_sum", token_cache_sum);
  m.impl("token_cache_sum_backward", token_cache_sum_backward);
}
