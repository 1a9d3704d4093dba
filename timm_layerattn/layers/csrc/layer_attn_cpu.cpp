// Fused CPU inference kernels for the layer-attention branches (float32, contiguous NCHW).
//
// Every branch convolves a block-sized map with the depth-wise 3x3 value conv and combines the result
// with the block output through per-(sample, channel) scales. Done with PyTorch ops, that is a oneDNN
// depth-wise conv (which reorders NCHW input and output through blocked copies) and several full-size
// elementwise passes. Here each (sample, channel) plane is copied once into a small zero-bordered buffer
// that stays in L1, convolved there and finished in the same loop, so a branch costs one read of each
// input map and one write of each output. Because the source plane is buffered first, outputs may
// overwrite the inputs (the block output is updated in place; no full-size temporaries are allocated).
//
// Built on first use by timm_layerattn/layers/native.py; the Python modules keep an equivalent PyTorch
// path for every other case (training, autograd, other dtypes or layouts, TorchScript, torch.compile).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

// Depth-wise 3x3 taps of one channel, row-major (kernel row 0 is the row above).
struct Taps {
  float k0, k1, k2, k3, k4, k5, k6, k7, k8;
  explicit Taps(const float* k)
      : k0(k[0]), k1(k[1]), k2(k[2]), k3(k[3]), k4(k[4]), k5(k[5]), k6(k[6]), k7(k[7]), k8(k[8]) {}
};

// The conv at flat position i of a plane held in a buffer with W + 1 zeros before and after it (so rows
// -1 and H read as zero). Neighbours left of column 0 and right of column W - 1 wrap to the adjacent
// row in the flat buffer, so they are selected away with the column masks.
inline float dw3x3_at(const float* p, const Taps& t, const unsigned char* has_left,
                      const unsigned char* has_right, int64_t W, int64_t i) {
  const float centre = t.k1 * p[i - W] + t.k4 * p[i] + t.k7 * p[i + W];
  const float left = t.k0 * p[i - W - 1] + t.k3 * p[i - 1] + t.k6 * p[i + W - 1];
  const float right = t.k2 * p[i - W + 1] + t.k5 * p[i + 1] + t.k8 * p[i + W + 1];
  return centre + (has_left[i] ? left : 0.f) + (has_right[i] ? right : 0.f);
}

// Runs `plane(p, c, buffer)` for every (sample, channel) plane p = b * C + c in parallel; `buffer` has
// room for one zero-bordered plane (pointer to its first element) plus `extra` floats of scratch after it.
template <typename PlaneFn>
void for_each_plane(int64_t B, int64_t C, int64_t H, int64_t W, int64_t extra, const PlaneFn& plane) {
  const int64_t hw = H * W;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(hw, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> storage(hw + 2 * (W + 1) + extra, 0.f);
    float* buffer = storage.data() + W + 1;
    for (int64_t p = begin; p < end; ++p) plane(p, p % C, buffer);
  });
}

// Column masks for the flat layout of an H x W plane.
struct ColumnMasks {
  std::vector<unsigned char> left, right;
  ColumnMasks(int64_t H, int64_t W) : left(H * W), right(H * W) {
    for (int64_t i = 0; i < H * W; ++i) {
      left[i] = (i % W) != 0;
      right[i] = (i % W) != W - 1;
    }
  }
};

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

void check_common(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4, "expected a 4-D [B, C, H, W] map, got ", x.dim(), "-D");
  check_map(x, x, "x");
  check_vec(weight, {x.size(1), 1, 3, 3}, "weight");
}

}  // namespace

// MRLA-light, inference: x <- x + gate_scale[b, c] * DW3(x) + shortcut_scale[c] * shortcut + shift[c].
at::Tensor mrla_light_(at::Tensor x, const at::Tensor& shortcut, const at::Tensor& weight,
                       const at::Tensor& gate_scale, const at::Tensor& shortcut_scale, const at::Tensor& shift) {
  check_common(x, weight);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), hw = H * W;
  check_map(shortcut, x, "shortcut");
  check_vec(gate_scale, {B, C}, "gate_scale");
  check_vec(shortcut_scale, {C}, "shortcut_scale");
  check_vec(shift, {C}, "shift");
  float* X = x.data_ptr<float>();
  const float* R = shortcut.const_data_ptr<float>();
  const float* K = weight.const_data_ptr<float>();
  const float* A = gate_scale.const_data_ptr<float>();
  const float* L = shortcut_scale.const_data_ptr<float>();
  const float* S = shift.const_data_ptr<float>();
  const ColumnMasks masks(H, W);
  const unsigned char* ml = masks.left.data();
  const unsigned char* mr = masks.right.data();
  for_each_plane(B, C, H, W, 0, [&](int64_t p, int64_t c, float* buf) {
    float* x_p = X + p * hw;
    const float* r_p = R + p * hw;
    std::memcpy(buf, x_p, hw * sizeof(float));
    const Taps taps(K + c * 9);
    const float a = A[p], l = L[c], s = S[c];
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) x_p[i] = buf[i] + a * dw3x3_at(buf, taps, ml, mr, W, i) + l * r_p[i] + s;
  });
  return x;
}

// KCLA, inference. Updates the normalised history and the block output in place:
//   hist <- hist + lerp_weight[b, c] * (x - hist)      (hist taken as zero when `fresh`)
//   x    <- x + relu(gate_scale[b, c] * DW3(hist) + shift[c])
at::Tensor kcla_(at::Tensor x, at::Tensor hist, const at::Tensor& lerp_weight, const at::Tensor& weight,
                 const at::Tensor& gate_scale, const at::Tensor& shift, bool fresh) {
  check_common(x, weight);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), hw = H * W;
  check_map(hist, x, "hist");
  check_vec(lerp_weight, {B, C}, "lerp_weight");
  check_vec(gate_scale, {B, C}, "gate_scale");
  check_vec(shift, {C}, "shift");
  TORCH_CHECK(hist.data_ptr() != x.data_ptr(), "hist must not alias x");
  float* X = x.data_ptr<float>();
  float* U = hist.data_ptr<float>();
  const float* WL = lerp_weight.const_data_ptr<float>();
  const float* K = weight.const_data_ptr<float>();
  const float* A = gate_scale.const_data_ptr<float>();
  const float* S = shift.const_data_ptr<float>();
  const ColumnMasks masks(H, W);
  const unsigned char* ml = masks.left.data();
  const unsigned char* mr = masks.right.data();
  for_each_plane(B, C, H, W, 0, [&](int64_t p, int64_t c, float* buf) {
    float* x_p = X + p * hw;
    float* u_p = U + p * hw;
    const float wl = WL[p];
    if (fresh) {
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) buf[i] = wl * x_p[i];
    } else {
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) buf[i] = u_p[i] + wl * (x_p[i] - u_p[i]);
    }
    std::memcpy(u_p, buf, hw * sizeof(float));
    const Taps taps(K + c * 9);
    const float a = A[p], s = S[c];
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) x_p[i] += std::max(a * dw3x3_at(buf, taps, ml, mr, W, i) + s, 0.f);
  });
  return x;
}

// MRLA-base, inference. With V_t = DW3(x) written to `value`, and the stage's earlier values V_0..V_{t-1}
// in `values`: x <- x + relu(shift[c] + sum_j weights[b, j, c] * V_j) over j = 0..t.
at::Tensor mrla_base_(at::Tensor x, at::Tensor value, at::TensorList values, const at::Tensor& weights,
                      const at::Tensor& weight, const at::Tensor& shift) {
  check_common(x, weight);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), hw = H * W;
  const int64_t T = static_cast<int64_t>(values.size()) + 1;
  check_map(value, x, "value");
  for (const auto& v : values) check_map(v, x, "values[j]");
  check_vec(weights, {B, T, C}, "weights");
  check_vec(shift, {C}, "shift");
  TORCH_CHECK(value.data_ptr() != x.data_ptr(), "value must not alias x");
  float* X = x.data_ptr<float>();
  float* V = value.data_ptr<float>();
  std::vector<const float*> earlier;
  for (const auto& v : values) earlier.push_back(v.const_data_ptr<float>());
  const float* WT = weights.const_data_ptr<float>();
  const float* K = weight.const_data_ptr<float>();
  const float* S = shift.const_data_ptr<float>();
  const ColumnMasks masks(H, W);
  const unsigned char* ml = masks.left.data();
  const unsigned char* mr = masks.right.data();
  for_each_plane(B, C, H, W, hw, [&](int64_t p, int64_t c, float* buf) {
    const int64_t b = p / C;
    float* x_p = X + p * hw;
    float* v_p = V + p * hw;
    float* acc = buf + hw + W + 1;  // scratch after the bordered plane
    std::memcpy(buf, x_p, hw * sizeof(float));
    const Taps taps(K + c * 9);
    const float w_t = WT[(b * T + T - 1) * C + c], s = S[c];
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) {
      const float v = dw3x3_at(buf, taps, ml, mr, W, i);
      v_p[i] = v;
      acc[i] = s + w_t * v;
    }
    for (int64_t j = 0; j + 1 < T; ++j) {
      const float* e_p = earlier[j] + p * hw;
      const float w_j = WT[(b * T + j) * C + c];
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) acc[i] += w_j * e_p[i];
    }
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) x_p[i] = buf[i] + std::max(acc[i], 0.f);
  });
  return x;
}

// Plain depth-wise 3x3 (zero padding 1, no bias): the value map of a block, e.g. for checks.
at::Tensor dw3x3(const at::Tensor& x, const at::Tensor& weight) {
  check_common(x, weight);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), hw = H * W;
  at::Tensor out = at::empty_like(x);
  const float* X = x.const_data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float* K = weight.const_data_ptr<float>();
  const ColumnMasks masks(H, W);
  const unsigned char* ml = masks.left.data();
  const unsigned char* mr = masks.right.data();
  for_each_plane(B, C, H, W, 0, [&](int64_t p, int64_t c, float* buf) {
    std::memcpy(buf, X + p * hw, hw * sizeof(float));
    const Taps taps(K + c * 9);
    float* o_p = O + p * hw;
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) o_p[i] = dw3x3_at(buf, taps, ml, mr, W, i);
  });
  return out;
}

TORCH_LIBRARY(timm_layerattn, m) {
  m.def("mrla_light_(Tensor(a!) x, Tensor shortcut, Tensor weight, Tensor gate_scale, Tensor shortcut_scale, "
        "Tensor shift) -> Tensor(a!)");
  m.def("kcla_(Tensor(a!) x, Tensor(b!) hist, Tensor lerp_weight, Tensor weight, Tensor gate_scale, "
        "Tensor shift, bool fresh) -> Tensor(a!)");
  m.def("mrla_base_(Tensor(a!) x, Tensor(b!) value, Tensor[] values, Tensor weights, Tensor weight, "
        "Tensor shift) -> Tensor(a!)");
  m.def("dw3x3(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(timm_layerattn, CPU, m) {
  m.impl("mrla_light_", mrla_light_);
  m.impl("kcla_", kcla_);
  m.impl("mrla_base_", mrla_base_);
  m.impl("dw3x3", dw3x3);
}
