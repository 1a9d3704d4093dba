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

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------------------
// Input checks

void check_map(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (NCHW)");
}

void check_vec(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The inputs every op shares: block output, value / query / key weights, folded norm, head layout.
void check_block(const at::Tensor& x, const at::Tensor& v_weight, const at::Tensor& q_weight,
                 const at::Tensor& k_weight, const at::Tensor& norm_scale, const at::Tensor& norm_shift,
                 int64_t head_dim) {
  TORCH_CHECK(x.dim() == 4, "x must be a 4-D [B, C, H, W] map, got ", x.dim(), "-D");
  check_map(x, x, "x");
  const int64_t C = x.size(1);
  check_vec(v_weight, {C, 1, 3, 3}, "v_weight");
  TORCH_CHECK(q_weight.dim() == 3 && q_weight.size(0) == 1 && q_weight.size(1) == 1 && q_weight.size(2) % 2 == 1,
              "q_weight must have shape [1, 1, k] with odd k, got ", q_weight.sizes());
  check_vec(q_weight, q_weight.sizes(), "q_weight");
  check_vec(k_weight, q_weight.sizes(), "k_weight");
  check_vec(norm_scale, {C}, "norm_scale");
  check_vec(norm_shift, {C}, "norm_shift");
  TORCH_CHECK(head_dim > 0 && C % head_dim == 0, "head_dim (", head_dim, ") must divide the channels (", C, ")");
}

// ---------------------------------------------------------------------------------------------------------
// Per-sample descriptor math

// Global average pool of every (sample, channel) plane, accumulated in double.
std::vector<float> plane_means(const float* x, int64_t planes, int64_t hw) {
  std::vector<float> means(planes);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(hw, 1));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* x_p = x + p * hw;
      double sum = 0.;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < hw; ++i) sum += x_p[i];
      means[p] = static_cast<float>(sum / static_cast<double>(hw));
    }
  });
  return means;
}

// ECA channel conv: out[c] = sum_j w[j] * in[c + j - (k - 1) / 2], zero padding (PyTorch Conv1d(1, 1, k)).
void channel_conv(const float* in, const float* w, int64_t k, int64_t C, float* out) {
  const int64_t pad = (k - 1) / 2;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t j0 = std::max<int64_t>(0, pad - c), j1 = std::min<int64_t>(k, C + pad - c);
    float acc = 0.f;
    for (int64_t j = j0; j < j1; ++j) acc += w[j] * in[c + j - pad];
    out[c] = acc;
  }
}

// Query and key [C] of sample b from its pooled descriptor.
void query_key(const std::vector<float>& pooled, int64_t b, int64_t C, const at::Tensor& q_weight,
               const at::Tensor& k_weight, float* q, float* k) {
  const int64_t taps = q_weight.size(2);
  channel_conv(pooled.data() + b * C, q_weight.const_data_ptr<float>(), taps, C, q);
  channel_conv(pooled.data() + b * C, k_weight.const_data_ptr<float>(), taps, C, k);
}

inline float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }

// ---------------------------------------------------------------------------------------------------------
// Depth-wise 3x3 on one plane

// Depth-wise 3x3 taps of one channel, row-major (kernel row 0 is the row above).
struct Taps {
  float k0, k1, k2, k3, k4, k5, k6, k7, k8;
  explicit Taps(const float* k)
      : k0(k[0]), k1(k[1]), k2(k[2]), k3(k[3]), k4(k[4]), k5(k[5]), k6(k[6]), k7(k[7]), k8(k[8]) {}
};

// Column masks of the flat layout of an H x W plane: whether position i has a left / right neighbour.
struct ColumnMasks {
  std::vector<unsigned char> left, right;
  ColumnMasks(int64_t H, int64_t W) : left(H * W), right(H * W) {
    for (int64_t i = 0; i < H * W; ++i) {
      left[i] = (i % W) != 0;
      right[i] = (i % W) != W - 1;
    }
  }
};

// One (sample, channel) plane copied into a buffer with W + 1 zeros before and after it, so rows -1 and H
// read as zero. Neighbours left of column 0 and right of column W - 1 wrap to the adjacent row in the flat
// buffer; the column masks select them away.
struct BorderedPlane {
  float* data;  // element (0, 0); the plane's H * W values follow contiguously
  const unsigned char* has_left;
  const unsigned char* has_right;
  int64_t W;

  // The depth-wise 3x3 conv (zero padding 1) at flat position i.
  inline float dw3x3(const Taps& t, int64_t i) const {
    const float* p = data;
    const float centre = t.k1 * p[i - W] + t.k4 * p[i] + t.k7 * p[i + W];
    const float left = t.k0 * p[i - W - 1] + t.k3 * p[i - 1] + t.k6 * p[i + W - 1];
    const float right = t.k2 * p[i - W + 1] + t.k5 * p[i + 1] + t.k8 * p[i + W + 1];
    return centre + (has_left[i] ? left : 0.f) + (has_right[i] ? right : 0.f);
  }
};

// Runs `plane(p, c, buf, scratch)` for every (sample, channel) plane p = b * C + c in parallel, with a
// per-thread bordered buffer for the plane and `extra` floats of scratch.
template <typename PlaneFn>
void for_each_plane(int64_t B, int64_t C, int64_t H, int64_t W, int64_t extra, const PlaneFn& plane) {
  const int64_t hw = H * W;
  const ColumnMasks masks(H, W);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(hw, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> storage(hw + 2 * (W + 1) + extra, 0.f);
    const BorderedPlane buf{storage.data() + W + 1, masks.left.data(), masks.right.data(), W};
    float* scratch = storage.data() + hw + 2 * (W + 1);
    for (int64_t p = begin; p < end; ++p) plane(p, p % C, buf, scratch);
  });
}

}  // namespace

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
  std::vector<float> gate_scale(B * C), shortcut_scale(C), q(C), k(C);
  for (int64_t c = 0; c < C; ++c) shortcut_scale[c] = LT[c] * NS[c];
  for (int64_t b = 0; b < B; ++b) {
    query_key(pooled, b, C, q_weight, k_weight, q.data(), k.data());
    for (int64_t c0 = 0; c0 < C; c0 += head_dim) {
      float dot = 0.f;
      for (int64_t c = c0; c < c0 + head_dim; ++c) dot += q[c] * k[c];
      const float gate = sigmoid(dot * static_cast<float>(attn_scale));
      for (int64_t c = c0; c < c0 + head_dim; ++c) gate_scale[b * C + c] = gate * NS[c];
    }
  }

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
  float* KN = keys_new.data_ptr<float>();
  const float* KO = keys ? keys->const_data_ptr<float>() : nullptr;
  std::vector<float> weights(B * T * C), q(C), scores(T);
  for (int64_t b = 0; b < B; ++b) {
    float* keys_b = KN + b * T * C;
    if (KO) std::memcpy(keys_b, KO + b * (T - 1) * C, (T - 1) * C * sizeof(float));
    query_key(pooled, b, C, q_weight, k_weight, q.data(), keys_b + (T - 1) * C);
    for (int64_t c0 = 0; c0 < C; c0 += head_dim) {
      float top = -INFINITY;
      for (int64_t j = 0; j < T; ++j) {
        float dot = 0.f;
        for (int64_t c = c0; c < c0 + head_dim; ++c) dot += q[c] * keys_b[j * C + c];
        scores[j] = dot * static_cast<float>(attn_scale);
        top = std::max(top, scores[j]);
      }
      float total = 0.f;
      for (int64_t j = 0; j < T; ++j) total += (scores[j] = std::exp(scores[j] - top));
      for (int64_t j = 0; j < T; ++j)
        for (int64_t c = c0; c < c0 + head_dim; ++c) weights[(b * T + j) * C + c] = scores[j] / total * NS[c];
    }
  }

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
