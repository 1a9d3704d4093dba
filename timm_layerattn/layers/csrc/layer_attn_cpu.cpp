// Fused CPU inference kernels for the layer-attention branches (float32, contiguous NCHW).
//
// Each op computes one block's whole attention branch in eval mode, with its BatchNorm folded into a
// per-channel (scale, shift) by the caller. The small per-sample math (pooled descriptor, ECA query and
// key convs, head gates or softmax weights) runs here too, because as dozens of tiny PyTorch ops per
// block it cost about as much as the branch's full-size work.
//
// The full-size work is a depth-wise 3x3 conv combined with the block output through per-(sample,
// channel) scales. PyTorch would run a oneDNN depth-wise conv (which reorders NCHW input and output
// through blocked copies) and several full-size elementwise passes. Here each (sample, channel) plane is
// copied once into a small zero-bordered buffer that stays in L1, convolved there and finished in the
// same loop: one read of each input map and one write of each output. Because the source plane is
// buffered first, the block output is updated in place (no full-size temporaries).
//
// Built on first use by timm_layerattn/layers/native.py. The Python modules compute the same results with
// PyTorch ops in every other case (training, autograd, other dtypes or layouts, TorchScript, tracing,
// torch.compile); tests/test_native_kernels.py checks both against each other and against the formulas.

#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "plane.h"

using namespace layer_attn;

// MRLA-light, eval mode, in place:
//   gate[b, h] = sigmoid(<Q_h, K_h> * attn_scale),   Q, K = ECA convs of the pooled x
//   x <- x + (gate * norm_scale) * DW3(x) + (lambda * norm_scale) * shortcut + norm_shift
at::Tensor mrla_light_(at::Tensor x, const at::Tensor& shortcut, const at::Tensor& v_weight,
                       const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& lambda_t,
                       const at::Tensor& norm_scale, const at::Tensor& norm_shift, int64_t head_dim,
                       double attn_scale) {
  check_block(x, v_weight, q_weight, k_weight, norm_scale, norm_shift, head_dim);
  check_map(shortcut, x, "shortcut");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), hw = H * W;
  check_vec(lambda_t, {C, 1, 1}, "lambda_t");
  float* X = x.data_ptr<float>();
  const float* NS = norm_scale.const_data_ptr<float>();
  const float* NT = norm_shift.const_data_ptr<float>();
  const float* LT = lambda_t.const_data_ptr<float>();

  const std::vector<float> pooled = plane_means(X, B * C, hw);
  const std::vector<float> gate_scale = light_gates(pooled, B, C, q_weight, k_weight, head_dim, attn_scale, NS);
  std::vector<float> shortcut_scale(C);
  for (int64_t c = 0; c < C; ++c) shortcut_scale[c] = LT[c] * NS[c];

  const float* R = shortcut.const_data_ptr<float>();
  const float* K = v_weight.const_data_ptr<float>();
  for_each_plane(B, C, H, W, 0, [&](int64_t p, int64_t c, const BorderedPlane& buf, float*) {
    float* x_p = X + p * hw;
    const float* r_p = R + p * hw;
    std::memcpy(buf.data, x_p, hw * sizeof(float));
    const Taps taps(K + c * 9);
    const float a = gate_scale[p], l = shortcut_scale[c], s = NT[c];
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) x_p[i] = buf.data[i] + a * buf.dw3x3(taps, i) + l * r_p[i] + s;
  });
  return x;
}

// KCLA, eval mode. With the incoming history A and weight sum Z (no `z`: no history yet, at the network's
// first block; `hist` is then only written) and alpha[b, h] = exp(min(||K_h|| / norm_d[h], max_log_weight)):
//   Z'   = Z + alpha                                   (returned, [B, g]; Z = 0 without `z`)
//   A    <- A + alpha / (Z' + history_eps) * (x - A)   (in place in `hist`; A = 0 without `z`)
//   gate = sigmoid(head_gate_weight @ (<Q_h, K_h> / max(||K_h||, key_norm_eps)))
//   x    <- x + relu((gate * norm_scale) * DW3(A) + norm_shift)
at::Tensor kcla_(at::Tensor x, at::Tensor hist, const c10::optional<at::Tensor>& z, const at::Tensor& v_weight,
                 const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& norm_d,
                 const at::Tensor& head_gate_weight, const at::Tensor& norm_scale, const at::Tensor& norm_shift,
                 int64_t head_dim, double history_eps, double max_log_weight, double key_norm_eps) {
  check_block(x, v_weight, q_weight, k_weight, norm_scale, norm_shift, head_dim);
  check_map(hist, x, "hist");
  // Empty maps (a batch of 0) have no storage to alias: their null data pointers compare equal.
  TORCH_CHECK(x.numel() == 0 || hist.data_ptr() != x.data_ptr(), "hist must not alias x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), hw = H * W, g = C / head_dim;
  check_vec(norm_d, {g}, "norm_d");
  check_vec(head_gate_weight, {g, g}, "head_gate_weight");
  if (z) check_vec(*z, {B, g}, "z");
  float* X = x.data_ptr<float>();
  float* U = hist.data_ptr<float>();
  const float* NS = norm_scale.const_data_ptr<float>();
  const float* NT = norm_shift.const_data_ptr<float>();
  const float* ND = norm_d.const_data_ptr<float>();
  const float* HG = head_gate_weight.const_data_ptr<float>();
  const float* Z = z ? z->const_data_ptr<float>() : nullptr;

  const std::vector<float> pooled = plane_means(X, B * C, hw);
  at::Tensor z_new = at::empty({B, g}, x.options());
  float* ZN = z_new.data_ptr<float>();
  std::vector<float> hist_weight(B * C), gate_scale(B * C), q(C), k(C), score(g);
  for (int64_t b = 0; b < B; ++b) {
    query_key(pooled, b, C, q_weight, k_weight, q.data(), k.data());
    for (int64_t h = 0; h < g; ++h) {
      float qk = 0.f, kk = 0.f;
      for (int64_t c = h * head_dim; c < (h + 1) * head_dim; ++c) {
        qk += q[c] * k[c];
        kk += k[c] * k[c];
      }
      const float key_norm = std::sqrt(kk);
      const float alpha = std::exp(std::min(key_norm / ND[h], static_cast<float>(max_log_weight)));
      const float z_h = (Z ? Z[b * g + h] : 0.f) + alpha;
      ZN[b * g + h] = z_h;
      const float w = alpha / (z_h + static_cast<float>(history_eps));
      for (int64_t c = h * head_dim; c < (h + 1) * head_dim; ++c) hist_weight[b * C + c] = w;
      score[h] = qk / std::max(key_norm, static_cast<float>(key_norm_eps));
    }
    for (int64_t h = 0; h < g; ++h) {
      float e = 0.f;
      for (int64_t j = 0; j < g; ++j) e += HG[h * g + j] * score[j];
      const float gate = sigmoid(e);
      for (int64_t c = h * head_dim; c < (h + 1) * head_dim; ++c) gate_scale[b * C + c] = gate * NS[c];
    }
  }

  const bool fresh = !Z;
  const float* K = v_weight.const_data_ptr<float>();
  for_each_plane(B, C, H, W, 0, [&](int64_t p, int64_t c, const BorderedPlane& buf, float*) {
    float* x_p = X + p * hw;
    float* u_p = U + p * hw;
    float* a_p = buf.data;
    const float wl = hist_weight[p];
    if (fresh) {
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) a_p[i] = wl * x_p[i];
    } else {
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) a_p[i] = u_p[i] + wl * (x_p[i] - u_p[i]);
    }
    std::memcpy(u_p, a_p, hw * sizeof(float));
    const Taps taps(K + c * 9);
    const float a = gate_scale[p], s = NT[c];
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) x_p[i] += std::max(a * buf.dw3x3(taps, i) + s, 0.f);
  });
  return z_new;
}

// MRLA-base, eval mode. With K_t, Q_t the ECA key and query of the pooled x, the stage's earlier keys
// (`keys`, [B, T-1, C]; none at a stage's first block) and values V_0..V_{t-1} (`values`):
//   keys' = [keys, K_t]                                           (returned, [B, T, C])
//   w[b, j, h] = softmax_j(<Q_h, K'_{j,h}> * attn_scale)
//   V_t = DW3(x)                                                  (written to `value`)
//   x <- x + relu(norm_shift + sum_j (w_j * norm_scale) * V_j)
at::Tensor mrla_base_(at::Tensor x, at::Tensor value, at::TensorList values, const c10::optional<at::Tensor>& keys,
                      const at::Tensor& v_weight, const at::Tensor& q_weight, const at::Tensor& k_weight,
                      const at::Tensor& norm_scale, const at::Tensor& norm_shift, int64_t head_dim,
                      double attn_scale) {
  check_block(x, v_weight, q_weight, k_weight, norm_scale, norm_shift, head_dim);
  check_map(value, x, "value");
  TORCH_CHECK(x.numel() == 0 || value.data_ptr() != x.data_ptr(), "value must not alias x");
  for (const auto& v : values) check_map(v, x, "values[j]");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), hw = H * W;
  const int64_t T = static_cast<int64_t>(values.size()) + 1;
  TORCH_CHECK(keys.has_value() == (T > 1), "keys must be given exactly when there are earlier values");
  if (keys) check_vec(*keys, {B, T - 1, C}, "keys");
  float* X = x.data_ptr<float>();
  const float* NS = norm_scale.const_data_ptr<float>();
  const float* NT = norm_shift.const_data_ptr<float>();

  const std::vector<float> pooled = plane_means(X, B * C, hw);
  at::Tensor keys_new = at::empty({B, T, C}, x.options());
  const std::vector<float> weights =
      cache_weights(pooled, B, T, C, keys ? keys->const_data_ptr<float>() : nullptr, keys_new.data_ptr<float>(),
                    q_weight, k_weight, head_dim, attn_scale, NS);

  std::vector<const float*> earlier;
  for (const auto& v : values) earlier.push_back(v.const_data_ptr<float>());
  float* V = value.data_ptr<float>();
  const float* K = v_weight.const_data_ptr<float>();
  for_each_plane(B, C, H, W, hw, [&](int64_t p, int64_t c, const BorderedPlane& buf, float* acc) {
    const int64_t b = p / C;
    float* x_p = X + p * hw;
    float* v_p = V + p * hw;
    std::memcpy(buf.data, x_p, hw * sizeof(float));
    const Taps taps(K + c * 9);
    const float w_t = weights[(b * T + T - 1) * C + c], s = NT[c];
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) {
      const float v = buf.dw3x3(taps, i);
      v_p[i] = v;
      acc[i] = s + w_t * v;
    }
    for (int64_t j = 0; j + 1 < T; ++j) {
      const float* e_p = earlier[j] + p * hw;
      const float w_j = weights[(b * T + j) * C + c];
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) acc[i] += w_j * e_p[i];
    }
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) x_p[i] = buf.data[i] + std::max(acc[i], 0.f);
  });
  return keys_new;
}

TORCH_LIBRARY(timm_layerattn, m) {
  m.def("mrla_light_(Tensor(a!) x, Tensor shortcut, Tensor v_weight, Tensor q_weight, Tensor k_weight, "
        "Tensor lambda_t, Tensor norm_scale, Tensor norm_shift, int head_dim, float attn_scale) -> Tensor(a!)");
  m.def("kcla_(Tensor(a!) x, Tensor(b!) hist, Tensor? z, Tensor v_weight, Tensor q_weight, Tensor k_weight, "
        "Tensor norm_d, Tensor head_gate_weight, Tensor norm_scale, Tensor norm_shift, int head_dim, "
        "float history_eps, float max_log_weight, float key_norm_eps) -> Tensor");
  m.def("mrla_base_(Tensor(a!) x, Tensor(b!) value, Tensor[] values, Tensor? keys, Tensor v_weight, "
        "Tensor q_weight, Tensor k_weight, Tensor norm_scale, Tensor norm_shift, int head_dim, "
        "float attn_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(timm_layerattn, CPU, m) {
  m.impl("mrla_light_", mrla_light_);
  m.impl("kcla_", kcla_);
  m.impl("mrla_base_", mrla_base_);
}
