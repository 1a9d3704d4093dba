// Shared helpers of the fused CPU kernels (float32, contiguous NCHW): input checks, the per-sample ECA
// descriptor maths and the depth-wise 3x3 conv on one (sample, channel) plane held in L1.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace layer_attn {

// ---------------------------------------------------------------------------------------------------------
// Input checks

inline void check_map(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (NCHW)");
}

inline void check_vec(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The inputs every op shares: block output, value / query / key weights, folded norm, head layout.
inline void check_block(const at::Tensor& x, const at::Tensor& v_weight, const at::Tensor& q_weight,
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
inline std::vector<float> plane_means(const float* x, int64_t planes, int64_t hw) {
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
inline void channel_conv(const float* in, const float* w, int64_t k, int64_t C, float* out) {
  const int64_t pad = (k - 1) / 2;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t j0 = std::max<int64_t>(0, pad - c), j1 = std::min<int64_t>(k, C + pad - c);
    float acc = 0.f;
    for (int64_t j = j0; j < j1; ++j) acc += w[j] * in[c + j - pad];
    out[c] = acc;
  }
}

// Query and key [C] of sample b from its pooled descriptor.
inline void query_key(const std::vector<float>& pooled, int64_t b, int64_t C, const at::Tensor& q_weight,
               const at::Tensor& k_weight, float* q, float* k) {
  const int64_t taps = q_weight.size(2);
  channel_conv(pooled.data() + b * C, q_weight.const_data_ptr<float>(), taps, C, q);
  channel_conv(pooled.data() + b * C, k_weight.const_data_ptr<float>(), taps, C, k);
}

inline float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }

// MRLA-light's head gates of every sample, per channel: gate[b * C + c] = sigmoid(<Q_h, K_h> * attn_scale) *
// scale[c] (scale: a folded norm's, or null for 1), with Q, K the ECA convs of the pooled descriptor.
inline std::vector<float> light_gates(const std::vector<float>& pooled, int64_t B, int64_t C,
                                      const at::Tensor& q_weight, const at::Tensor& k_weight, int64_t head_dim,
                                      double attn_scale, const float* scale) {
  std::vector<float> gate(B * C), q(C), k(C);
  for (int64_t b = 0; b < B; ++b) {
    query_key(pooled, b, C, q_weight, k_weight, q.data(), k.data());
    for (int64_t c0 = 0; c0 < C; c0 += head_dim) {
      float dot = 0.f;
      for (int64_t c = c0; c < c0 + head_dim; ++c) dot += q[c] * k[c];
      const float g = sigmoid(dot * static_cast<float>(attn_scale));
      for (int64_t c = c0; c < c0 + head_dim; ++c) gate[b * C + c] = g * (scale ? scale[c] : 1.f);
    }
  }
  return gate;
}

// MRLA-base's cache step on the per-sample descriptors: `keys_new` [B, T, C] receives the earlier keys
// (`keys_old`, [B, T-1, C], null when T = 1) followed by each sample's key K_t, and
// weights[(b * T + j) * C + c] = softmax_j(<Q_h, K_{j,h}> * attn_scale) * scale[c] (scale: null for 1).
inline std::vector<float> cache_weights(const std::vector<float>& pooled, int64_t B, int64_t T, int64_t C,
                                        const float* keys_old, float* keys_new, const at::Tensor& q_weight,
                                        const at::Tensor& k_weight, int64_t head_dim, double attn_scale,
                                        const float* scale) {
  std::vector<float> weights(B * T * C), q(C), scores(T);
  for (int64_t b = 0; b < B; ++b) {
    float* keys_b = keys_new + b * T * C;
    if (keys_old) std::memcpy(keys_b, keys_old + b * (T - 1) * C, (T - 1) * C * sizeof(float));
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
        for (int64_t c = c0; c < c0 + head_dim; ++c)
          weights[(b * T + j) * C + c] = scores[j] / total * (scale ? scale[c] : 1.f);
    }
  }
  return weights;
}

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
inline void for_each_plane(int64_t B, int64_t C, int64_t H, int64_t W, int64_t extra, const PlaneFn& plane) {
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

}  // namespace layer_attn

