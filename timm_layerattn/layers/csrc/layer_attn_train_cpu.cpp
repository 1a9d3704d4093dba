// Fused CPU training kernels for the memory-lean autograd Functions of timm_layerattn/layers/lean.py
// (float32, contiguous NCHW).
//
// The Functions keep only a block's BatchNorm input `pre`, its shortcut, the carried state and per-channel
// vectors; everything else is recomputed. These kernels make that recomputation nearly free: every
// full-size quantity of a block's tail and attention branch (the post-ReLU block output x, the history or
// value map, the depth-wise conv, the branch's BatchNorm input) is computed plane by plane in L1 from the
// few maps that are read anyway, and never written to memory unless it is an output.
//
// Forward of a branch is two passes: `*_train_values` computes the branch's BatchNorm input and its
// per-plane moments (the batch statistics need every sample before anything can be normalised), then
// `affine_residual_` finishes `out = x + act(u * a + b)` in place. Backward is two passes as well: the
// first recomputes the branch and reduces the BatchNorm gradient sums, the second recomputes again and
// writes every input gradient, with the depth-wise conv's transpose and weight gradient done on the plane
// in L1. Per-plane partial sums are accumulated in double and reduced over the batch in a fixed order, so
// results do not depend on the thread count.
//
// The maths of each op is written out above it; lean.py, kcla.py and mrla.py compute the same with PyTorch
// ops wherever these kernels do not apply, and tests/test_lean.py holds both to each other.

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "plane.h"

using namespace layer_attn;

namespace {

using OptTensor = c10::optional<at::Tensor>;

// Reductions over a plane run in float over chunks of this many elements and add the chunk sums in double:
// vectorised float accumulators, with the rounding of a short float sum.
constexpr int64_t kChunk = 256;

// Calls body(i0, i1) on consecutive chunks [i0, i1) of [0, n), at most kChunk long.
template <typename Body>
inline void for_chunks(int64_t n, const Body& body) {
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) body(i0, std::min(n, i0 + kChunk));
}

// ---------------------------------------------------------------------------------------------------------
// Shared pieces

// The block output `x = relu(pre * s + t + r)` of the tail (BatchNorm, drop path and residual folded into
// the per-plane s, t). Forward and every recomputation use this one expression, so they agree bit for bit.
inline float tail_value(float pre, float s, float t, float r) { return std::max(std::fma(pre, s, t) + r, 0.f); }

// KCLA's history step `h + w (x - h)`, shared by forward and backward for the same reason.
inline float history_step(float h, float x, float w) { return std::fma(w, x - h, h); }

const float* opt_data(const OptTensor& t) { return t ? t->const_data_ptr<float>() : nullptr; }

void check_opt_map(const OptTensor& t, const at::Tensor& like, const char* name) {
  if (t) check_map(*t, like, name);
}

void check_planes(const at::Tensor& t, int64_t B, int64_t C, const char* name) { check_vec(t, {B, C}, name); }

void check_weight(const at::Tensor& v_weight, int64_t C) { check_vec(v_weight, {C, 1, 3, 3}, "v_weight"); }

// Depth-wise taps rotated by 180 degrees: the transpose of the conv is the conv with these.
Taps rotated(const float* k) {
  const float r[9] = {k[8], k[7], k[6], k[5], k[4], k[3], k[2], k[1], k[0]};
  return Taps(r);
}

// Per-thread working memory of a plane loop: `bordered` zero-bordered plane buffers and `flat` plain ones.
struct PlaneBuffers {
  std::vector<float> storage;
  std::vector<BorderedPlane> bordered;
  std::vector<float*> flat;
  PlaneBuffers(int64_t H, int64_t W, int n_bordered, int n_flat, const ColumnMasks& masks) {
    const int64_t hw = H * W, padded = hw + 2 * (W + 1);
    storage.assign(n_bordered * padded + n_flat * hw, 0.f);
    for (int i = 0; i < n_bordered; ++i)
      bordered.push_back(BorderedPlane{storage.data() + i * padded + W + 1, masks.left.data(), masks.right.data(), W});
    for (int i = 0; i < n_flat; ++i) flat.push_back(storage.data() + n_bordered * padded + i * hw);
  }
};

// Runs `plane(p, c, buffers)` for every plane p = b * C + c in parallel.
template <typename PlaneFn>
void plane_loop(int64_t B, int64_t C, int64_t H, int64_t W, int n_bordered, int n_flat, const PlaneFn& plane) {
  const int64_t hw = H * W;
  const ColumnMasks masks(H, W);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(hw, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    PlaneBuffers buffers(H, W, n_bordered, n_flat, masks);
    for (int64_t p = begin; p < end; ++p) plane(p, p % C, buffers);
  });
}

// Weight gradient of the depth-wise conv on one plane: dk[tap] += sum_i g[i] * in[i + offset(tap)], with `in`
// bordered (zero rows above and below, column masks for the sides).
void dw_weight_grad(const float* g, const BorderedPlane in, int64_t hw, double* dk) {
  const int64_t W = in.W;
  const float* p = in.data;
  for (int64_t i0 = 0; i0 < hw; i0 += kChunk) {
    const int64_t i1 = std::min(hw, i0 + kChunk);
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0, a8 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7, a8)
    for (int64_t i = i0; i < i1; ++i) {
      const float gi = g[i];
      const float gl = in.has_left[i] ? gi : 0.f, gr = in.has_right[i] ? gi : 0.f;
      a0 += gl * p[i - W - 1];
      a1 += gi * p[i - W];
      a2 += gr * p[i - W + 1];
      a3 += gl * p[i - 1];
      a4 += gi * p[i];
      a5 += gr * p[i + 1];
      a6 += gl * p[i + W - 1];
      a7 += gi * p[i + W];
      a8 += gr * p[i + W + 1];
    }
    dk[0] += a0; dk[1] += a1; dk[2] += a2; dk[3] += a3; dk[4] += a4;
    dk[5] += a5; dk[6] += a6; dk[7] += a7; dk[8] += a8;
  }
}

// Sum over the batch of per-plane partial sums [B, C, n] (double), in a fixed order, as float [C, n].
at::Tensor reduce_batch(const std::vector<double>& parts, int64_t B, int64_t C, int64_t n, at::IntArrayRef shape,
                        const at::TensorOptions& options) {
  at::Tensor out = at::empty(shape, options);
  float* o = out.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.;
      for (int64_t b = 0; b < B; ++b) s += parts[(b * C + c) * n + j];
      o[c * n + j] = static_cast<float>(s);
    }
  return out;
}

at::Tensor to_planes(const std::vector<double>& v, int64_t B, int64_t C, const at::TensorOptions& options) {
  at::Tensor out = at::empty({B, C}, options);
  float* o = out.data_ptr<float>();
  for (int64_t p = 0; p < B * C; ++p) o[p] = static_cast<float>(v[p]);
  return out;
}

// BatchNorm backward from the per-plane sums P1 = sum g and P2 = sum g * u of the gradient g of the norm's
// output (drop-path factor included) and its input u. With S1, S2 their batch sums, N = B * H * W and the
// normalised input xhat = (u - mean) * invstd:
//   d bias = S1,   d weight = sum g * xhat = invstd * (S2 - mean * S1)
//   d u = c1 * g + c2 * u + c3 with c1 = weight * invstd and, for batch statistics only,
//         c2 = -weight * invstd^2 * d weight / N,  c3 = -c1 * S1 / N - c2 * mean.
struct NormGrad {
  std::vector<float> c1, c2, c3;
  at::Tensor d_weight, d_bias;
};

NormGrad norm_grad(const std::vector<double>& p1, const std::vector<double>& p2, int64_t B, int64_t C, int64_t hw,
                   const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight, bool batch_stats) {
  check_vec(mean, {C}, "mean");
  check_vec(invstd, {C}, "invstd");
  check_vec(weight, {C}, "norm_weight");
  const float* M = mean.const_data_ptr<float>();
  const float* S = invstd.const_data_ptr<float>();
  const float* G = weight.const_data_ptr<float>();
  NormGrad r{std::vector<float>(C), std::vector<float>(C, 0.f), std::vector<float>(C, 0.f),
             at::empty({C}, mean.options()), at::empty({C}, mean.options())};
  float* dw = r.d_weight.data_ptr<float>();
  float* db = r.d_bias.data_ptr<float>();
  const double n = static_cast<double>(B * hw);
  for (int64_t c = 0; c < C; ++c) {
    double s1 = 0., s2 = 0.;
    for (int64_t b = 0; b < B; ++b) {
      s1 += p1[b * C + c];
      s2 += p2[b * C + c];
    }
    const double invstd_c = S[c], gamma = G[c];
    const double d_weight = invstd_c * (s2 - M[c] * s1);
    db[c] = static_cast<float>(s1);
    dw[c] = static_cast<float>(d_weight);
    const double c1 = gamma * invstd_c;
    r.c1[c] = static_cast<float>(c1);
    if (batch_stats) {
      const double c2 = -gamma * invstd_c * invstd_c * d_weight / n;
      r.c2[c] = static_cast<float>(c2);
      r.c3[c] = static_cast<float>(-c1 * s1 / n - c2 * M[c]);
    }
  }
  return r;
}

std::vector<float> keep_factors(const OptTensor& keep, int64_t B) {
  std::vector<float> k(B, 1.f);
  if (keep) {
    check_vec(*keep, {B}, "keep");
    const float* K = keep->const_data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) k[b] = K[b];
  }
  return k;
}

at::Tensor moments_tensor(const std::vector<double>& s1, const std::vector<double>& s2, int64_t B, int64_t C) {
  at::Tensor m = at::empty({2, B, C}, at::TensorOptions().dtype(at::kDouble));
  double* d = m.data_ptr<double>();
  std::copy(s1.begin(), s1.end(), d);
  std::copy(s2.begin(), s2.end(), d + B * C);
  return m;
}

// The tail's recipe for x (checked once per op that recomputes it).
struct Tail {
  const float *pre, *r, *s, *t;
  Tail(const at::Tensor& pre_, const at::Tensor& shortcut, const at::Tensor& scale, const at::Tensor& shift,
       const at::Tensor& like) {
    check_map(pre_, like, "pre");
    check_map(shortcut, like, "shortcut");
    check_planes(scale, like.size(0), like.size(1), "scale");
    check_planes(shift, like.size(0), like.size(1), "shift");
    pre = pre_.const_data_ptr<float>();
    r = shortcut.const_data_ptr<float>();
    s = scale.const_data_ptr<float>();
    t = shift.const_data_ptr<float>();
  }
  // x of plane p into `out`.
  void plane(int64_t p, int64_t hw, float* out) const {
    const float* pre_p = pre + p * hw;
    const float* r_p = r + p * hw;
    const float s_p = s[p], t_p = t[p];
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) out[i] = tail_value(pre_p[i], s_p, t_p, r_p[i]);
  }
};

void check_4d(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, name, " must be a 4-D [B, C, H, W] map, got ", x.dim(), "-D");
  check_map(x, x, name);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// BatchNorm statistics

// mean, invstd [C] and per-plane scale, shift [B, C] with norm(u) * keep == u * scale + shift. Batch statistics
// from the plane moments [2, B, C] of u (`count` values per channel; biased variance, as BatchNorm normalises)
// or the running statistics; with `update`, running <- running + factor * (batch - running), the variance
// unbiased, as nn.BatchNorm2d updates them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_plane_affine(
    const at::Tensor& moments, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& keep, double eps, double factor, bool batch_stats, bool update,
    int64_t count) {
  TORCH_CHECK(moments.dim() == 3 && moments.size(0) == 2 && moments.scalar_type() == at::kDouble &&
                  moments.is_contiguous(),
              "moments must be a contiguous float64 [2, B, C] tensor, got ", moments.sizes());
  const int64_t B = moments.size(1), C = moments.size(2);
  if (weight) check_vec(*weight, {C}, "weight");
  if (bias) check_vec(*bias, {C}, "bias");
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), "running_mean and running_var go together");
  if (running_mean) {
    check_vec(*running_mean, {C}, "running_mean");
    check_vec(*running_var, {C}, "running_var");
  }
  TORCH_CHECK(batch_stats || running_mean, "running statistics are needed without batch statistics");
  TORCH_CHECK(!batch_stats || count > 0, "count must be positive");
  const std::vector<float> k = keep_factors(keep, B);
  const double* M = moments.const_data_ptr<double>();
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor mean = at::empty({C}, opts), invstd = at::empty({C}, opts);
  at::Tensor scale = at::empty({B, C}, opts), shift = at::empty({B, C}, opts);
  float *Mo = mean.data_ptr<float>(), *Io = invstd.data_ptr<float>();
  float *So = scale.data_ptr<float>(), *To = shift.data_ptr<float>();
  float* RM = running_mean ? running_mean->data_ptr<float>() : nullptr;
  float* RV = running_var ? running_var->data_ptr<float>() : nullptr;
  const float* Wt = weight ? weight->const_data_ptr<float>() : nullptr;
  const float* Bi = bias ? bias->const_data_ptr<float>() : nullptr;
  const double n = static_cast<double>(count);
  for (int64_t c = 0; c < C; ++c) {
    double m, v;
    if (batch_stats) {
      double s1 = 0., s2 = 0.;
      for (int64_t b = 0; b < B; ++b) {
        s1 += M[b * C + c];
        s2 += M[(B + b) * C + c];
      }
      m = s1 / n;
      v = std::max(s2 / n - m * m, 0.);
      if (update && RM) {
        RM[c] += static_cast<float>(factor * (m - RM[c]));
        RV[c] += static_cast<float>(factor * (v * n / std::max(n - 1., 1.) - RV[c]));
      }
    } else {
      m = RM[c];
      v = RV[c];
    }
    const float is = static_cast<float>(1. / std::sqrt(v + eps));
    Mo[c] = static_cast<float>(m);
    Io[c] = is;
    const float sc = Wt ? is * Wt[c] : is;
    const float sh = (Bi ? Bi[c] : 0.f) - Mo[c] * sc;
    for (int64_t b = 0; b < B; ++b) {
      So[b * C + c] = sc * k[b];
      To[b * C + c] = sh * k[b];
    }
  }
  return {mean, invstd, scale, shift};
}

// ---------------------------------------------------------------------------------------------------------
// ECA channel conv of pooled descriptors (query and key of every family)

// out[b, f, c] = sum_j w[f, j] * pooled[b, c + j - (k - 1) / 2], zero padding: PyTorch's Conv1d(1, F, k) on the
// descriptor viewed as [B, 1, C]. A oneDNN conv1d costs tens of microseconds on these tiny inputs.
at::Tensor channel_conv_op(const at::Tensor& pooled, const at::Tensor& weight) {
  TORCH_CHECK(pooled.dim() == 2, "pooled must be [B, C], got ", pooled.dim(), "-D");
  check_vec(pooled, pooled.sizes(), "pooled");
  TORCH_CHECK(weight.dim() == 3 && weight.size(1) == 1 && weight.size(2) % 2 == 1,
              "weight must have shape [F, 1, k] with odd k, got ", weight.sizes());
  check_vec(weight, weight.sizes(), "weight");
  const int64_t B = pooled.size(0), C = pooled.size(1), F = weight.size(0), k = weight.size(2);
  at::Tensor out = at::empty({B, F, C}, pooled.options());
  const float *P = pooled.const_data_ptr<float>(), *Wt = weight.const_data_ptr<float>();
  float* O = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t f = 0; f < F; ++f) channel_conv(P + b * C, Wt + f * k, k, C, O + (b * F + f) * C);
  return out;
}

// Gradients of `channel_conv_op`: d pooled[b, c] = sum_f sum_j w[f, j] grad[b, f, c - j + pad] (valid indices),
// d w[f, j] = sum_b sum_c grad[b, f, c] pooled[b, c + j - pad].
std::tuple<at::Tensor, at::Tensor> channel_conv_backward_op(const at::Tensor& grad, const at::Tensor& pooled,
                                                            const at::Tensor& weight) {
  TORCH_CHECK(pooled.dim() == 2, "pooled must be [B, C], got ", pooled.dim(), "-D");
  check_vec(pooled, pooled.sizes(), "pooled");
  check_vec(weight, weight.sizes(), "weight");
  const int64_t B = pooled.size(0), C = pooled.size(1), F = weight.size(0), k = weight.size(2), pad = (k - 1) / 2;
  check_vec(grad, {B, F, C}, "grad");
  at::Tensor g_pooled = at::zeros({B, C}, pooled.options());
  const float *G = grad.const_data_ptr<float>(), *P = pooled.const_data_ptr<float>();
  const float* Wt = weight.const_data_ptr<float>();
  float* GP = g_pooled.data_ptr<float>();
  std::vector<double> gw(F * k, 0.);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t f = 0; f < F; ++f) {
      const float* g = G + (b * F + f) * C;
      const float* p = P + b * C;
      const float* w = Wt + f * k;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t c0 = std::max<int64_t>(0, pad - j), c1 = std::min<int64_t>(C, C + pad - j);
        double acc = 0.;
        for (int64_t c = c0; c < c1; ++c) {
          acc += static_cast<double>(g[c]) * p[c + j - pad];
          GP[b * C + c + j - pad] += w[j] * g[c];
        }
        gw[f * k + j] += acc;
      }
    }
  at::Tensor g_weight = at::empty_like(weight);
  float* GW = g_weight.data_ptr<float>();
  for (int64_t i = 0; i < F * k; ++i) GW[i] = static_cast<float>(gw[i]);
  return {g_pooled, g_weight};
}

// ---------------------------------------------------------------------------------------------------------
// Block tail

// Per-plane moments of a map: [2, B, C] float64 with sum x and sum x^2 over each plane (batch statistics
// of a BatchNorm input in one pass).
at::Tensor plane_moments(const at::Tensor& x) {
  check_4d(x, "x");
  const int64_t B = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  const float* X = x.const_data_ptr<float>();
  std::vector<double> s1(B * C), s2(B * C);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(hw, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* x_p = X + p * hw;
      double a = 0., q = 0.;
      for_chunks(hw, [&](int64_t i0, int64_t i1) {
        float c_a = 0.f, c_q = 0.f;
#pragma omp simd reduction(+ : c_a, c_q)
        for (int64_t i = i0; i < i1; ++i) {
          c_a += x_p[i];
          c_q += x_p[i] * x_p[i];
        }
        a += c_a; q += c_q;
      });
      s1[p] = a;
      s2[p] = q;
    }
  });
  return moments_tensor(s1, s2, B, C);
}

// x = relu(pre * scale + shift + shortcut) and pooled = mean of each plane of x ([B, C]).
std::tuple<at::Tensor, at::Tensor> tail_forward(const at::Tensor& pre, const at::Tensor& shortcut,
                                                const at::Tensor& scale, const at::Tensor& shift) {
  check_4d(pre, "pre");
  const Tail tail(pre, shortcut, scale, shift, pre);
  const int64_t B = pre.size(0), C = pre.size(1), hw = pre.size(2) * pre.size(3);
  at::Tensor x = at::empty_like(pre);
  at::Tensor pooled = at::empty({B, C}, pre.options());
  float* X = x.data_ptr<float>();
  float* P = pooled.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(hw, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* x_p = X + p * hw;
      tail.plane(p, hw, x_p);
      double sum = 0.;
      for_chunks(hw, [&](int64_t i0, int64_t i1) {
        float c_sum = 0.f;
#pragma omp simd reduction(+ : c_sum)
        for (int64_t i = i0; i < i1; ++i) c_sum += x_p[i];
        sum += c_sum;
      });
      P[p] = static_cast<float>(sum / static_cast<double>(hw));
    }
  });
  return {x, pooled};
}

// The tail's first backward pass: g = (grad_x + grad_pooled / HW) * [x > 0] into `GS` (the shortcut's
// gradient), and per plane A = sum g, Q = sum g * pre (the BatchNorm gradient sums before any per-plane factor).
void tail_grad_pass(const Tail& tail, int64_t B, int64_t C, int64_t H, int64_t W, const float* GX, const float* GP,
                    float* GS, std::vector<double>& A, std::vector<double>& Q) {
  const int64_t hw = H * W;
  plane_loop(B, C, H, W, 0, 1, [&](int64_t p, int64_t, PlaneBuffers& buf) {
    float* x = buf.flat[0];
    tail.plane(p, hw, x);
    const float* pre_p = tail.pre + p * hw;
    const float* gx_p = GX ? GX + p * hw : nullptr;
    const float gp = GP ? GP[p] / static_cast<float>(hw) : 0.f;
    float* gs_p = GS + p * hw;
    double a = 0., q = 0.;
    for (int64_t i0 = 0; i0 < hw; i0 += kChunk) {
      const int64_t i1 = std::min(hw, i0 + kChunk);
      float ca = 0.f, cq = 0.f;
      if (gx_p) {
#pragma omp simd reduction(+ : ca, cq)
        for (int64_t i = i0; i < i1; ++i) {
          const float g = x[i] > 0.f ? gx_p[i] + gp : 0.f;
          gs_p[i] = g;
          ca += g;
          cq += g * pre_p[i];
        }
      } else {
#pragma omp simd reduction(+ : ca, cq)
        for (int64_t i = i0; i < i1; ++i) {
          const float g = x[i] > 0.f ? gp : 0.f;
          gs_p[i] = g;
          ca += g;
          cq += g * pre_p[i];
        }
      }
      a += ca;
      q += cq;
    }
    A[p] = a;
    Q[p] = q;
  });
}

// The BatchNorm's input gradient when its output gradient is g * gain + offset (per-plane gain, offset):
// d u = c1 * (gain * g + offset) + c2 * u + c3 (see `norm_grad`); `offset` may be null.
void norm_input_grad(const NormGrad& ng, const float* G, const float* U, const float* gain, const float* offset,
                     int64_t B, int64_t C, int64_t hw, float* out) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(hw, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % C;
      const float c1 = ng.c1[c] * gain[p], c2 = ng.c2[c];
      const float c3 = ng.c3[c] + (offset ? ng.c1[c] * offset[p] : 0.f);
      const float* g_p = G + p * hw;
      const float* u_p = U + p * hw;
      float* o = out + p * hw;
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) o[i] = c1 * g_p[i] + c2 * u_p[i] + c3;
    }
  });
}

// Backward of the tail x = relu(norm(pre) * keep + shortcut) (and of pooled = mean(x)). With
// g = (grad_x + grad_pooled / HW) * [x > 0]:
//   d shortcut = g,   d pre, d weight, d bias = BatchNorm backward of g * keep (see `norm_grad`).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tail_backward(
    const at::Tensor& pre, const at::Tensor& shortcut, const at::Tensor& scale, const at::Tensor& shift,
    const OptTensor& grad_x, const OptTensor& grad_pooled, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& norm_weight, const OptTensor& keep, bool batch_stats) {
  check_4d(pre, "pre");
  const Tail tail(pre, shortcut, scale, shift, pre);
  const int64_t B = pre.size(0), C = pre.size(1), H = pre.size(2), W = pre.size(3), hw = H * W;
  check_opt_map(grad_x, pre, "grad_x");
  if (grad_pooled) check_planes(*grad_pooled, B, C, "grad_pooled");
  const std::vector<float> k = keep_factors(keep, B);
  at::Tensor g_short = at::empty_like(pre), g_pre = at::empty_like(pre);
  float* GS = g_short.data_ptr<float>();
  std::vector<double> p1(B * C), p2(B * C);
  tail_grad_pass(tail, B, C, H, W, opt_data(grad_x), opt_data(grad_pooled), GS, p1, p2);
  std::vector<float> gain(B * C);
  for (int64_t p = 0; p < B * C; ++p) {
    gain[p] = k[p / C];
    p1[p] *= gain[p];
    p2[p] *= gain[p];
  }
  const NormGrad ng = norm_grad(p1, p2, B, C, hw, mean, invstd, norm_weight, batch_stats);
  norm_input_grad(ng, GS, tail.pre, gain.data(), nullptr, B, C, hw, g_pre.data_ptr<float>());
  return {g_pre, g_short, ng.d_weight, ng.d_bias};
}

// The tail's first backward pass alone, for tails whose per-plane factor depends on the pooled norm output (a
// channel gate): g = (grad_x + grad_pooled / HW) * [x > 0] (the shortcut's gradient) and the per-plane sums
// [2, B, C] (float64) of g and of g * pre.
std::tuple<at::Tensor, at::Tensor> tail_grad_sums(const at::Tensor& pre, const at::Tensor& shortcut,
                                                  const at::Tensor& scale, const at::Tensor& shift,
                                                  const OptTensor& grad_x, const OptTensor& grad_pooled) {
  check_4d(pre, "pre");
  const Tail tail(pre, shortcut, scale, shift, pre);
  const int64_t B = pre.size(0), C = pre.size(1), H = pre.size(2), W = pre.size(3);
  check_opt_map(grad_x, pre, "grad_x");
  if (grad_pooled) check_planes(*grad_pooled, B, C, "grad_pooled");
  at::Tensor g_short = at::empty_like(pre);
  std::vector<double> a(B * C), q(B * C);
  tail_grad_pass(tail, B, C, H, W, opt_data(grad_x), opt_data(grad_pooled), g_short.data_ptr<float>(), a, q);
  return {g_short, moments_tensor(a, q, B, C)};
}

// BatchNorm backward for the output gradient g * gain + offset (per-plane gain, offset [B, C]; offset
// optional), from the per-plane sums [2, B, C] (float64) of that gradient and of it times the input u:
// gradients (u, weight, bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_planes(
    const at::Tensor& g, const at::Tensor& u, const at::Tensor& sums, const at::Tensor& gain, const OptTensor& offset,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& norm_weight, bool batch_stats) {
  check_4d(u, "u");
  check_map(g, u, "g");
  const int64_t B = u.size(0), C = u.size(1), hw = u.size(2) * u.size(3);
  check_planes(gain, B, C, "gain");
  if (offset) check_planes(*offset, B, C, "offset");
  TORCH_CHECK(sums.dim() == 3 && sums.size(0) == 2 && sums.size(1) == B && sums.size(2) == C &&
              sums.scalar_type() == at::kDouble && sums.is_contiguous() && sums.device().is_cpu(),
              "sums must be a contiguous float64 CPU tensor of shape [2, ", B, ", ", C, "]");
  const double* S = sums.const_data_ptr<double>();
  const std::vector<double> p1(S, S + B * C), p2(S + B * C, S + 2 * B * C);
  const NormGrad ng = norm_grad(p1, p2, B, C, hw, mean, invstd, norm_weight, batch_stats);
  at::Tensor g_u = at::empty_like(u);
  norm_input_grad(ng, g.const_data_ptr<float>(), u.const_data_ptr<float>(), gain.const_data_ptr<float>(),
                  opt_data(offset), B, C, hw, g_u.data_ptr<float>());
  return {g_u, ng.d_weight, ng.d_bias};
}

// ---------------------------------------------------------------------------------------------------------
// A block's inner BatchNorm + ReLU

// y = relu(u * scale + shift) with per-plane scale, shift [B, C] (the norm's affine map of u).
at::Tensor norm_relu_forward(const at::Tensor& u, const at::Tensor& scale, const at::Tensor& shift) {
  check_4d(u, "u");
  const int64_t B = u.size(0), C = u.size(1), hw = u.size(2) * u.size(3);
  check_planes(scale, B, C, "scale");
  check_planes(shift, B, C, "shift");
  at::Tensor y = at::empty_like(u);
  const float *U = u.const_data_ptr<float>(), *S = scale.const_data_ptr<float>(), *T = shift.const_data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(hw, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* u_p = U + p * hw;
      float* y_p = Y + p * hw;
      const float s = S[p], t = T[p];
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) y_p[i] = std::max(std::fma(u_p[i], s, t), 0.f);
    }
  });
  return y;
}

// Backward of y = relu(norm(u)): g = grad_y * [u * scale + shift > 0], then the BatchNorm backward of g (see
// `norm_grad`). Two passes: the per-plane sums of g and g * u, then d u with g recomputed (never stored).
// Returns (d u, d weight, d bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_relu_backward(
    const at::Tensor& u, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& grad_y,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& norm_weight, bool batch_stats) {
  check_4d(u, "u");
  check_map(grad_y, u, "grad_y");
  const int64_t B = u.size(0), C = u.size(1), hw = u.size(2) * u.size(3);
  check_planes(scale, B, C, "scale");
  check_planes(shift, B, C, "shift");
  const float *U = u.const_data_ptr<float>(), *S = scale.const_data_ptr<float>(), *T = shift.const_data_ptr<float>();
  const float* G = grad_y.const_data_ptr<float>();
  std::vector<double> p1(B * C), p2(B * C);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(hw, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* u_p = U + p * hw;
      const float* g_p = G + p * hw;
      const float s = S[p], t = T[p];
      double a = 0., q = 0.;
      for_chunks(hw, [&](int64_t i0, int64_t i1) {
        float ca = 0.f, cq = 0.f;
#pragma omp simd reduction(+ : ca, cq)
        for (int64_t i = i0; i < i1; ++i) {
          const float g = std::fma(u_p[i], s, t) > 0.f ? g_p[i] : 0.f;
          ca += g;
          cq += g * u_p[i];
        }
        a += ca;
        q += cq;
      });
      p1[p] = a;
      p2[p] = q;
    }
  });
  const NormGrad ng = norm_grad(p1, p2, B, C, hw, mean, invstd, norm_weight, batch_stats);
  at::Tensor g_u = at::empty_like(u);
  float* GU = g_u.data_ptr<float>();
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % C;
      const float c1 = ng.c1[c], c2 = ng.c2[c], c3 = ng.c3[c], s = S[p], t = T[p];
      const float* u_p = U + p * hw;
      const float* g_p = G + p * hw;
      float* o = GU + p * hw;
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) {
        const float g = std::fma(u_p[i], s, t) > 0.f ? g_p[i] : 0.f;
        o[i] = c1 * g + c2 * u_p[i] + c3;
      }
    }
  });
  return {g_u, ng.d_weight, ng.d_bias};
}

// out <- x + act(out * a + b), in place on `out` (which holds a branch's BatchNorm input u), with the
// per-plane a, b ([B, C]) of the norm's affine map times the drop-path factor; act is ReLU or identity.
at::Tensor affine_residual_(at::Tensor out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                            bool relu) {
  check_4d(out, "out");
  check_map(x, out, "x");
  const int64_t B = out.size(0), C = out.size(1), hw = out.size(2) * out.size(3);
  check_planes(a, B, C, "a");
  check_planes(b, B, C, "b");
  float* O = out.data_ptr<float>();
  const float* X = x.const_data_ptr<float>();
  const float* A = a.const_data_ptr<float>();
  const float* Bs = b.const_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(hw, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* o = O + p * hw;
      const float* x_p = X + p * hw;
      const float a_p = A[p], b_p = Bs[p];
      if (relu) {
#pragma omp simd
        for (int64_t i = 0; i < hw; ++i) o[i] = x_p[i] + std::max(std::fma(o[i], a_p, b_p), 0.f);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < hw; ++i) o[i] = x_p[i] + std::fma(o[i], a_p, b_p);
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// KCLA

// A' = h + w (x - h) (A' = w x without a history), u = gate * DW3(A'). Returns (u, A', moments of u).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kcla_train_values(const at::Tensor& x, const OptTensor& hist,
                                                                 const at::Tensor& weight, const at::Tensor& gate,
                                                                 const at::Tensor& v_weight) {
  check_4d(x, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), hw = H * W;
  check_opt_map(hist, x, "hist");
  check_planes(weight, B, C, "weight");
  check_planes(gate, B, C, "gate");
  check_weight(v_weight, C);
  at::Tensor u = at::empty_like(x), hist_new = at::empty_like(x);
  const float *X = x.const_data_ptr<float>(), *Hs = opt_data(hist), *Wt = weight.const_data_ptr<float>();
  const float *Gt = gate.const_data_ptr<float>(), *K = v_weight.const_data_ptr<float>();
  float *U = u.data_ptr<float>(), *HN = hist_new.data_ptr<float>();
  std::vector<double> s1(B * C), s2(B * C);
  plane_loop(B, C, H, W, 1, 0, [&](int64_t p, int64_t c, PlaneBuffers& buf) {
    const BorderedPlane a = buf.bordered[0];
    const float* x_p = X + p * hw;
    const float w = Wt[p];
    if (Hs) {
      const float* h_p = Hs + p * hw;
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) a.data[i] = history_step(h_p[i], x_p[i], w);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) a.data[i] = w * x_p[i];
    }
    std::memcpy(HN + p * hw, a.data, hw * sizeof(float));
    const Taps taps(K + c * 9);
    const float g = Gt[p];
    float* u_p = U + p * hw;
    double m = 0., q = 0.;
    for_chunks(hw, [&](int64_t i0, int64_t i1) {
      float c_m = 0.f, c_q = 0.f;
#pragma omp simd reduction(+ : c_m, c_q)
      for (int64_t i = i0; i < i1; ++i) {
        const float v = g * a.dw3x3(taps, i);
        u_p[i] = v;
        c_m += v;
        c_q += v * v;
      }
      m += c_m; q += c_q;
    });
    s1[p] = m;
    s2[p] = q;
  });
  return {u, hist_new, moments_tensor(s1, s2, B, C)};
}

// Backward of one KCLA step out = x + relu(BN(gate * DW3(A'))) * keep, A' = h + w (x - h), with x recomputed
// from the tail (pre, shortcut, scale, shift) and z = u * a + b the pre-ReLU branch (a, b include keep):
//   g_bn = grad_out * keep * [z > 0];  d u = c1 g_bn + c2 u + c3 (`norm_grad`)
//   d gate = sum d u * V,  dV = gate * d u,  dA' = DW3^T(dV) + grad_hist,  d v_weight = sum dV (x) A'
//   d h = (1 - w) dA',  d x = grad_out + w dA',  d w = sum dA' * (x - h)   (without h: d w = sum dA' * x)
// Returns (d x, d h, d w, d gate, d v_weight, d norm_weight, d norm_bias); d h is undefined without h.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kcla_train_backward(
    const at::Tensor& pre, const at::Tensor& shortcut, const at::Tensor& scale, const at::Tensor& shift,
    const OptTensor& hist, const at::Tensor& weight, const at::Tensor& gate, const at::Tensor& v_weight,
    const at::Tensor& a, const at::Tensor& b, const OptTensor& keep, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& norm_weight, bool batch_stats, const at::Tensor& grad_out,
    const OptTensor& grad_hist) {
  check_4d(pre, "pre");
  const Tail tail(pre, shortcut, scale, shift, pre);
  const int64_t B = pre.size(0), C = pre.size(1), H = pre.size(2), W = pre.size(3), hw = H * W;
  check_opt_map(hist, pre, "hist");
  check_planes(weight, B, C, "weight");
  check_planes(gate, B, C, "gate");
  check_planes(a, B, C, "a");
  check_planes(b, B, C, "b");
  check_weight(v_weight, C);
  check_map(grad_out, pre, "grad_out");
  check_opt_map(grad_hist, pre, "grad_hist");
  const std::vector<float> k = keep_factors(keep, B);
  const float *Hs = opt_data(hist), *Wt = weight.const_data_ptr<float>(), *Gt = gate.const_data_ptr<float>();
  const float *K = v_weight.const_data_ptr<float>(), *A = a.const_data_ptr<float>(), *Bs = b.const_data_ptr<float>();
  const float *GO = grad_out.const_data_ptr<float>(), *GH = opt_data(grad_hist);

  // Recompute x (flat[0]) and A' (bordered[0]) of plane p.
  auto recompute = [&](int64_t p, PlaneBuffers& buf) {
    float* x = buf.flat[0];
    tail.plane(p, hw, x);
    float* hn = buf.bordered[0].data;
    const float w = Wt[p];
    if (Hs) {
      const float* h_p = Hs + p * hw;
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) hn[i] = history_step(h_p[i], x[i], w);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) hn[i] = w * x[i];
    }
  };

  std::vector<double> p1(B * C), p2(B * C);
  plane_loop(B, C, H, W, 1, 1, [&](int64_t p, int64_t c, PlaneBuffers& buf) {
    recompute(p, buf);
    const BorderedPlane hn = buf.bordered[0];
    const Taps taps(K + c * 9);
    const float g = Gt[p], a_p = A[p], b_p = Bs[p], kb = k[p / C];
    const float* go = GO + p * hw;
    double s = 0., q = 0.;
    for_chunks(hw, [&](int64_t i0, int64_t i1) {
      float c_s = 0.f, c_q = 0.f;
#pragma omp simd reduction(+ : c_s, c_q)
      for (int64_t i = i0; i < i1; ++i) {
        const float u = g * hn.dw3x3(taps, i);
        const float gb = std::fma(u, a_p, b_p) > 0.f ? go[i] * kb : 0.f;
        c_s += gb;
        c_q += gb * u;
      }
      s += c_s; q += c_q;
    });
    p1[p] = s;
    p2[p] = q;
  });
  const NormGrad ng = norm_grad(p1, p2, B, C, hw, mean, invstd, norm_weight, batch_stats);

  at::Tensor g_x = at::empty_like(pre);
  at::Tensor g_hist = Hs ? at::empty_like(pre) : at::Tensor();
  float *GX = g_x.data_ptr<float>(), *GHO = Hs ? g_hist.data_ptr<float>() : nullptr;
  const std::vector<float> zeros(GH ? 0 : hw, 0.f);  // stands in for an absent grad_hist
  std::vector<double> d_gate(B * C), d_w(B * C), d_k(B * C * 9, 0.);
  plane_loop(B, C, H, W, 2, 1, [&](int64_t p, int64_t c, PlaneBuffers& buf) {
    recompute(p, buf);
    const float* x = buf.flat[0];
    const BorderedPlane hn = buf.bordered[0];
    const BorderedPlane dv = buf.bordered[1];
    const Taps taps(K + c * 9);
    const Taps taps_t = rotated(K + c * 9);
    const float g = Gt[p], a_p = A[p], b_p = Bs[p], kb = k[p / C];
    const float c1 = ng.c1[c], c2 = ng.c2[c], c3 = ng.c3[c];
    const float* go = GO + p * hw;
    double dg = 0.;
    for_chunks(hw, [&](int64_t i0, int64_t i1) {
      float c_dg = 0.f;
#pragma omp simd reduction(+ : c_dg)
      for (int64_t i = i0; i < i1; ++i) {
        const float v = hn.dw3x3(taps, i);
        const float u = g * v;
        const float gb = std::fma(u, a_p, b_p) > 0.f ? go[i] * kb : 0.f;
        const float du = c1 * gb + c2 * u + c3;
        c_dg += du * v;
        dv.data[i] = g * du;
      }
      dg += c_dg;
    });
    d_gate[p] = dg;
    dw_weight_grad(dv.data, hn, hw, d_k.data() + p * 9);
    const float w = Wt[p];
    const float* gh = GH ? GH + p * hw : zeros.data();
    float* gx = GX + p * hw;
    double dw = 0.;
    if (Hs) {
      const float* h_p = Hs + p * hw;
      float* gho = GHO + p * hw;
      for_chunks(hw, [&](int64_t i0, int64_t i1) {
        float c_dw = 0.f;
#pragma omp simd reduction(+ : c_dw)
        for (int64_t i = i0; i < i1; ++i) {
          const float dh = dv.dw3x3(taps_t, i) + gh[i];
          gho[i] = (1.f - w) * dh;
          gx[i] = go[i] + w * dh;
          c_dw += dh * (x[i] - h_p[i]);
        }
        dw += c_dw;
      });
    } else {
      for_chunks(hw, [&](int64_t i0, int64_t i1) {
        float c_dw = 0.f;
#pragma omp simd reduction(+ : c_dw)
        for (int64_t i = i0; i < i1; ++i) {
          const float dh = dv.dw3x3(taps_t, i) + gh[i];
          gx[i] = go[i] + w * dh;
          c_dw += dh * x[i];
        }
        dw += c_dw;
      });
    }
    d_w[p] = dw;
  });
  const auto opts = pre.options();
  return {g_x, g_hist, to_planes(d_w, B, C, opts), to_planes(d_gate, B, C, opts),
          reduce_batch(d_k, B, C, 9, {C, 1, 3, 3}, opts), ng.d_weight, ng.d_bias};
}

// ---------------------------------------------------------------------------------------------------------
// MRLA-light

// u = gate * DW3(x) + lambda * shortcut. Returns (u, moments of u).
std::tuple<at::Tensor, at::Tensor> mrla_light_train_values(const at::Tensor& x, const at::Tensor& shortcut,
                                                           const at::Tensor& gate, const at::Tensor& v_weight,
                                                           const at::Tensor& lambda_t) {
  check_4d(x, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), hw = H * W;
  check_map(shortcut, x, "shortcut");
  check_planes(gate, B, C, "gate");
  check_weight(v_weight, C);
  check_vec(lambda_t, {C, 1, 1}, "lambda_t");
  at::Tensor u = at::empty_like(x);
  const float *X = x.const_data_ptr<float>(), *R = shortcut.const_data_ptr<float>();
  const float *Gt = gate.const_data_ptr<float>(), *K = v_weight.const_data_ptr<float>();
  const float* L = lambda_t.const_data_ptr<float>();
  float* U = u.data_ptr<float>();
  std::vector<double> s1(B * C), s2(B * C);
  plane_loop(B, C, H, W, 1, 0, [&](int64_t p, int64_t c, PlaneBuffers& buf) {
    const BorderedPlane xb = buf.bordered[0];
    std::memcpy(xb.data, X + p * hw, hw * sizeof(float));
    const Taps taps(K + c * 9);
    const float g = Gt[p], l = L[c];
    const float* r = R + p * hw;
    float* u_p = U + p * hw;
    double m = 0., q = 0.;
    for_chunks(hw, [&](int64_t i0, int64_t i1) {
      float c_m = 0.f, c_q = 0.f;
#pragma omp simd reduction(+ : c_m, c_q)
      for (int64_t i = i0; i < i1; ++i) {
        const float v = std::fma(g, xb.dw3x3(taps, i), l * r[i]);
        u_p[i] = v;
        c_m += v;
        c_q += v * v;
      }
      m += c_m; q += c_q;
    });
    s1[p] = m;
    s2[p] = q;
  });
  return {u, moments_tensor(s1, s2, B, C)};
}

// Backward of out = x + BN(gate * DW3(x) + lambda * r) * keep, x recomputed from the tail and r the tail's
// shortcut or, where given, `lambda_input` (DLA-light's refreshed shortcut):
//   g_bn = grad_out * keep;  d u = c1 g_bn + c2 u + c3;  d gate = sum d u * V;  d lambda = sum d u * r
//   d r = lambda * d u;  d x = grad_out + DW3^T(gate * d u);  d v_weight = sum (gate * d u) (x) x
// Returns (d x, d r, d gate, d v_weight, d lambda, d norm_weight, d norm_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mrla_light_train_backward(const at::Tensor& pre, const at::Tensor& shortcut, const at::Tensor& scale,
                          const at::Tensor& shift, const at::Tensor& gate, const at::Tensor& v_weight,
                          const at::Tensor& lambda_t, const OptTensor& keep, const at::Tensor& mean,
                          const at::Tensor& invstd, const at::Tensor& norm_weight, bool batch_stats,
                          const at::Tensor& grad_out, const OptTensor& lambda_input) {
  check_4d(pre, "pre");
  const Tail tail(pre, shortcut, scale, shift, pre);
  check_opt_map(lambda_input, pre, "lambda_input");
  const float* R = lambda_input ? lambda_input->const_data_ptr<float>() : tail.r;
  const int64_t B = pre.size(0), C = pre.size(1), H = pre.size(2), W = pre.size(3), hw = H * W;
  check_planes(gate, B, C, "gate");
  check_weight(v_weight, C);
  check_vec(lambda_t, {C, 1, 1}, "lambda_t");
  check_map(grad_out, pre, "grad_out");
  const std::vector<float> k = keep_factors(keep, B);
  const float *Gt = gate.const_data_ptr<float>(), *K = v_weight.const_data_ptr<float>();
  const float *L = lambda_t.const_data_ptr<float>(), *GO = grad_out.const_data_ptr<float>();

  std::vector<double> p1(B * C), p2(B * C);
  plane_loop(B, C, H, W, 1, 0, [&](int64_t p, int64_t c, PlaneBuffers& buf) {
    const BorderedPlane xb = buf.bordered[0];
    tail.plane(p, hw, xb.data);
    const Taps taps(K + c * 9);
    const float g = Gt[p], l = L[c], kb = k[p / C];
    const float* r = R + p * hw;
    const float* go = GO + p * hw;
    double s = 0., q = 0.;
    for_chunks(hw, [&](int64_t i0, int64_t i1) {
      float c_s = 0.f, c_q = 0.f;
#pragma omp simd reduction(+ : c_s, c_q)
      for (int64_t i = i0; i < i1; ++i) {
        const float u = std::fma(g, xb.dw3x3(taps, i), l * r[i]);
        const float gb = go[i] * kb;
        c_s += gb;
        c_q += gb * u;
      }
      s += c_s; q += c_q;
    });
    p1[p] = s;
    p2[p] = q;
  });
  const NormGrad ng = norm_grad(p1, p2, B, C, hw, mean, invstd, norm_weight, batch_stats);

  at::Tensor g_x = at::empty_like(pre), g_short = at::empty_like(pre);
  float *GX = g_x.data_ptr<float>(), *GS = g_short.data_ptr<float>();
  std::vector<double> d_gate(B * C), d_lambda(B * C), d_k(B * C * 9, 0.);
  plane_loop(B, C, H, W, 2, 0, [&](int64_t p, int64_t c, PlaneBuffers& buf) {
    const BorderedPlane xb = buf.bordered[0];
    const BorderedPlane dv = buf.bordered[1];
    tail.plane(p, hw, xb.data);
    const Taps taps(K + c * 9);
    const Taps taps_t = rotated(K + c * 9);
    const float g = Gt[p], l = L[c], kb = k[p / C];
    const float c1 = ng.c1[c], c2 = ng.c2[c], c3 = ng.c3[c];
    const float* r = R + p * hw;
    const float* go = GO + p * hw;
    float* gs = GS + p * hw;
    double dg = 0., dl = 0.;
    for_chunks(hw, [&](int64_t i0, int64_t i1) {
      float c_dg = 0.f, c_dl = 0.f;
#pragma omp simd reduction(+ : c_dg, c_dl)
      for (int64_t i = i0; i < i1; ++i) {
        const float v = xb.dw3x3(taps, i);
        const float u = std::fma(g, v, l * r[i]);
        const float du = c1 * (go[i] * kb) + c2 * u + c3;
        c_dg += du * v;
        c_dl += du * r[i];
        gs[i] = l * du;
        dv.data[i] = g * du;
      }
      dg += c_dg; dl += c_dl;
    });
    d_gate[p] = dg;
    d_lambda[p] = dl;
    dw_weight_grad(dv.data, xb, hw, d_k.data() + p * 9);
    float* gx = GX + p * hw;
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) gx[i] = go[i] + dv.dw3x3(taps_t, i);
  });
  const auto opts = pre.options();
  return {g_x, g_short, to_planes(d_gate, B, C, opts), reduce_batch(d_k, B, C, 9, {C, 1, 3, 3}, opts),
          reduce_batch(d_lambda, B, C, 1, {C, 1, 1}, opts), ng.d_weight, ng.d_bias};
}

// ---------------------------------------------------------------------------------------------------------
// DLA-light's shortcut refresh

// y = DW3(r) + m * r with a per-plane m [B, C].
at::Tensor dw_scale_add(const at::Tensor& r, const at::Tensor& m, const at::Tensor& w) {
  check_4d(r, "r");
  const int64_t B = r.size(0), C = r.size(1), H = r.size(2), W = r.size(3), hw = H * W;
  check_planes(m, B, C, "m");
  check_weight(w, C);
  at::Tensor y = at::empty_like(r);
  const float *R = r.const_data_ptr<float>(), *M = m.const_data_ptr<float>(), *K = w.const_data_ptr<float>();
  float* Y = y.data_ptr<float>();
  plane_loop(B, C, H, W, 1, 0, [&](int64_t p, int64_t c, PlaneBuffers& buf) {
    const BorderedPlane rb = buf.bordered[0];
    std::memcpy(rb.data, R + p * hw, hw * sizeof(float));
    const Taps taps(K + c * 9);
    const float m_p = M[p];
    float* y_p = Y + p * hw;
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) y_p[i] = std::fma(m_p, rb.data[i], rb.dw3x3(taps, i));
  });
  return y;
}

// Backward of `dw_scale_add`: d r = DW3^T(g) + m * g;  d m = sum g * r;  d w = sum g (x) r.
// Returns (d r, d m, d w).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_scale_add_backward(const at::Tensor& grad, const at::Tensor& r,
                                                                     const at::Tensor& m, const at::Tensor& w) {
  check_4d(r, "r");
  check_map(grad, r, "grad");
  const int64_t B = r.size(0), C = r.size(1), H = r.size(2), W = r.size(3), hw = H * W;
  check_planes(m, B, C, "m");
  check_weight(w, C);
  at::Tensor g_r = at::empty_like(r);
  const float *R = r.const_data_ptr<float>(), *M = m.const_data_ptr<float>(), *K = w.const_data_ptr<float>();
  const float* G = grad.const_data_ptr<float>();
  float* GR = g_r.data_ptr<float>();
  std::vector<double> d_m(B * C), d_k(B * C * 9, 0.);
  plane_loop(B, C, H, W, 2, 0, [&](int64_t p, int64_t c, PlaneBuffers& buf) {
    const BorderedPlane rb = buf.bordered[0];
    const BorderedPlane gb = buf.bordered[1];
    std::memcpy(rb.data, R + p * hw, hw * sizeof(float));
    std::memcpy(gb.data, G + p * hw, hw * sizeof(float));
    const Taps taps_t = rotated(K + c * 9);
    const float m_p = M[p];
    float* gr = GR + p * hw;
    double dm = 0.;
    for_chunks(hw, [&](int64_t i0, int64_t i1) {
      float c_dm = 0.f;
#pragma omp simd reduction(+ : c_dm)
      for (int64_t i = i0; i < i1; ++i) {
        c_dm += gb.data[i] * rb.data[i];
        gr[i] = std::fma(m_p, gb.data[i], gb.dw3x3(taps_t, i));
      }
      dm += c_dm;
    });
    d_m[p] = dm;
    dw_weight_grad(gb.data, rb, hw, d_k.data() + p * 9);
  });
  const auto opts = r.options();
  return {g_r, to_planes(d_m, B, C, opts), reduce_batch(d_k, B, C, 9, {C, 1, 3, 3}, opts)};
}

// ---------------------------------------------------------------------------------------------------------
// MRLA-base

// V_t = DW3(x), S = w_t V_t + sum_j w_j V_j over the stage's earlier values, with the per-channel softmax
// weights `weights` [B, T, C] (the last one is this block's). Returns (S, V_t, moments of S).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mrla_base_train_values(const at::Tensor& x, at::TensorList values,
                                                                      const at::Tensor& weights,
                                                                      const at::Tensor& v_weight) {
  check_4d(x, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), hw = H * W;
  const int64_t T = static_cast<int64_t>(values.size()) + 1;
  for (const auto& v : values) check_map(v, x, "values[j]");
  check_vec(weights, {B, T, C}, "weights");
  check_weight(v_weight, C);
  at::Tensor s = at::empty_like(x), value = at::empty_like(x);
  std::vector<const float*> earlier;
  for (const auto& v : values) earlier.push_back(v.const_data_ptr<float>());
  const float *X = x.const_data_ptr<float>(), *Wt = weights.const_data_ptr<float>();
  const float* K = v_weight.const_data_ptr<float>();
  float *S = s.data_ptr<float>(), *V = value.data_ptr<float>();
  std::vector<double> s1(B * C), s2(B * C);
  plane_loop(B, C, H, W, 1, 0, [&](int64_t p, int64_t c, PlaneBuffers& buf) {
    const int64_t b = p / C;
    const BorderedPlane xb = buf.bordered[0];
    std::memcpy(xb.data, X + p * hw, hw * sizeof(float));
    const Taps taps(K + c * 9);
    float* s_p = S + p * hw;
    float* v_p = V + p * hw;
    const float w_t = Wt[(b * T + T - 1) * C + c];
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) {
      const float v = xb.dw3x3(taps, i);
      v_p[i] = v;
      s_p[i] = w_t * v;
    }
    for (int64_t j = 0; j + 1 < T; ++j) {
      const float* e = earlier[j] + p * hw;
      const float w_j = Wt[(b * T + j) * C + c];
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) s_p[i] = std::fma(w_j, e[i], s_p[i]);
    }
    double m = 0., q = 0.;
    for_chunks(hw, [&](int64_t i0, int64_t i1) {
      float c_m = 0.f, c_q = 0.f;
#pragma omp simd reduction(+ : c_m, c_q)
      for (int64_t i = i0; i < i1; ++i) {
        c_m += s_p[i];
        c_q += static_cast<double>(s_p[i]) * s_p[i];
      }
      m += c_m; q += c_q;
    });
    s1[p] = m;
    s2[p] = q;
  });
  return {s, value, moments_tensor(s1, s2, B, C)};
}

// Backward of out = x + relu(BN(S)) * keep, S = w_t DW3(x) + sum_j w_j V_j, x recomputed from the tail and
// z = S * a + b:
//   g_bn = grad_out * keep * [z > 0];  d S = c1 g_bn + c2 S + c3
//   d w_j = sum d S * V_j,  d V_j = w_j d S,  d V_t = w_t d S + grad_value,  d x = grad_out + DW3^T(d V_t)
// Returns (d x, d weights [B, T, C], d v_weight, d norm_weight, d norm_bias, [d V_j]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>
mrla_base_train_backward(const at::Tensor& pre, const at::Tensor& shortcut, const at::Tensor& scale,
                         const at::Tensor& shift, at::TensorList values, const at::Tensor& weights,
                         const at::Tensor& v_weight, const at::Tensor& a, const at::Tensor& b,
                         const OptTensor& keep, const at::Tensor& mean, const at::Tensor& invstd,
                         const at::Tensor& norm_weight, bool batch_stats, const at::Tensor& grad_out,
                         const OptTensor& grad_value) {
  check_4d(pre, "pre");
  const Tail tail(pre, shortcut, scale, shift, pre);
  const int64_t B = pre.size(0), C = pre.size(1), H = pre.size(2), W = pre.size(3), hw = H * W;
  const int64_t T = static_cast<int64_t>(values.size()) + 1;
  for (const auto& v : values) check_map(v, pre, "values[j]");
  check_vec(weights, {B, T, C}, "weights");
  check_weight(v_weight, C);
  check_planes(a, B, C, "a");
  check_planes(b, B, C, "b");
  check_map(grad_out, pre, "grad_out");
  check_opt_map(grad_value, pre, "grad_value");
  const std::vector<float> k = keep_factors(keep, B);
  std::vector<const float*> earlier;
  for (const auto& v : values) earlier.push_back(v.const_data_ptr<float>());
  const float *Wt = weights.const_data_ptr<float>(), *K = v_weight.const_data_ptr<float>();
  const float *A = a.const_data_ptr<float>(), *Bs = b.const_data_ptr<float>();
  const float *GO = grad_out.const_data_ptr<float>(), *GV = opt_data(grad_value);

  // Recompute x (bordered[0]), V_t (flat[0]) and S (flat[1]) of plane p.
  auto recompute = [&](int64_t p, int64_t c, PlaneBuffers& buf) {
    const int64_t bi = p / C;
    const BorderedPlane xb = buf.bordered[0];
    tail.plane(p, hw, xb.data);
    const Taps taps(K + c * 9);
    float* v = buf.flat[0];
    float* s = buf.flat[1];
    const float w_t = Wt[(bi * T + T - 1) * C + c];
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) {
      v[i] = xb.dw3x3(taps, i);
      s[i] = w_t * v[i];
    }
    for (int64_t j = 0; j + 1 < T; ++j) {
      const float* e = earlier[j] + p * hw;
      const float w_j = Wt[(bi * T + j) * C + c];
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) s[i] = std::fma(w_j, e[i], s[i]);
    }
  };

  std::vector<double> p1(B * C), p2(B * C);
  plane_loop(B, C, H, W, 1, 2, [&](int64_t p, int64_t c, PlaneBuffers& buf) {
    recompute(p, c, buf);
    const float* s = buf.flat[1];
    const float a_p = A[p], b_p = Bs[p], kb = k[p / C];
    const float* go = GO + p * hw;
    double m = 0., q = 0.;
    for_chunks(hw, [&](int64_t i0, int64_t i1) {
      float c_m = 0.f, c_q = 0.f;
#pragma omp simd reduction(+ : c_m, c_q)
      for (int64_t i = i0; i < i1; ++i) {
        const float gb = std::fma(s[i], a_p, b_p) > 0.f ? go[i] * kb : 0.f;
        c_m += gb;
        c_q += gb * s[i];
      }
      m += c_m; q += c_q;
    });
    p1[p] = m;
    p2[p] = q;
  });
  const NormGrad ng = norm_grad(p1, p2, B, C, hw, mean, invstd, norm_weight, batch_stats);

  at::Tensor g_x = at::empty_like(pre);
  at::Tensor g_weights = at::empty({B, T, C}, pre.options());
  std::vector<at::Tensor> g_values;
  std::vector<float*> gv_out;
  for (int64_t j = 0; j + 1 < T; ++j) {
    g_values.push_back(at::empty_like(pre));
    gv_out.push_back(g_values.back().data_ptr<float>());
  }
  float *GX = g_x.data_ptr<float>(), *GW = g_weights.data_ptr<float>();
  const std::vector<float> zeros(GV ? 0 : hw, 0.f);  // stands in for an absent grad_value
  std::vector<double> d_k(B * C * 9, 0.);
  plane_loop(B, C, H, W, 2, 2, [&](int64_t p, int64_t c, PlaneBuffers& buf) {
    const int64_t bi = p / C;
    recompute(p, c, buf);
    const BorderedPlane xb = buf.bordered[0];
    const BorderedPlane dvt = buf.bordered[1];
    const float* v = buf.flat[0];
    float* s = buf.flat[1];  // overwritten with d S
    const float a_p = A[p], b_p = Bs[p], kb = k[bi];
    const float c1 = ng.c1[c], c2 = ng.c2[c], c3 = ng.c3[c];
    const float* go = GO + p * hw;
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) {
      const float gb = std::fma(s[i], a_p, b_p) > 0.f ? go[i] * kb : 0.f;
      s[i] = c1 * gb + c2 * s[i] + c3;
    }
    for (int64_t j = 0; j + 1 < T; ++j) {
      const float* e = earlier[j] + p * hw;
      float* ge = gv_out[j] + p * hw;
      const float w_j = Wt[(bi * T + j) * C + c];
      double dw = 0.;
      for_chunks(hw, [&](int64_t i0, int64_t i1) {
        float c_dw = 0.f;
#pragma omp simd reduction(+ : c_dw)
        for (int64_t i = i0; i < i1; ++i) {
          c_dw += s[i] * e[i];
          ge[i] = w_j * s[i];
        }
        dw += c_dw;
      });
      GW[(bi * T + j) * C + c] = static_cast<float>(dw);
    }
    const float w_t = Wt[(bi * T + T - 1) * C + c];
    const float* gvin = GV ? GV + p * hw : zeros.data();
    double dw = 0.;
    for_chunks(hw, [&](int64_t i0, int64_t i1) {
      float c_dw = 0.f;
#pragma omp simd reduction(+ : c_dw)
      for (int64_t i = i0; i < i1; ++i) {
        c_dw += s[i] * v[i];
        dvt.data[i] = std::fma(w_t, s[i], gvin[i]);
      }
      dw += c_dw;
    });
    GW[(bi * T + T - 1) * C + c] = static_cast<float>(dw);
    dw_weight_grad(dvt.data, xb, hw, d_k.data() + p * 9);
    const Taps taps_t = rotated(K + c * 9);
    float* gx = GX + p * hw;
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) gx[i] = go[i] + dvt.dw3x3(taps_t, i);
  });
  return {g_x, g_weights, reduce_batch(d_k, B, C, 9, {C, 1, 3, 3}, pre.options()), ng.d_weight, ng.d_bias,
          g_values};
}

TORCH_LIBRARY_FRAGMENT(timm_layerattn, m) {
  m.def("norm_plane_affine(Tensor moments, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor? keep, float eps, float factor, bool batch_stats, bool update, int count) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("channel_conv(Tensor pooled, Tensor weight) -> Tensor");
  m.def("channel_conv_backward(Tensor grad, Tensor pooled, Tensor weight) -> (Tensor, Tensor)");
  m.def("plane_moments(Tensor x) -> Tensor");
  m.def("tail_forward(Tensor pre, Tensor shortcut, Tensor scale, Tensor shift) -> (Tensor, Tensor)");
  m.def("tail_backward(Tensor pre, Tensor shortcut, Tensor scale, Tensor shift, Tensor? grad_x, "
        "Tensor? grad_pooled, Tensor mean, Tensor invstd, Tensor norm_weight, Tensor? keep, bool batch_stats) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("tail_grad_sums(Tensor pre, Tensor shortcut, Tensor scale, Tensor shift, Tensor? grad_x, "
        "Tensor? grad_pooled) -> (Tensor, Tensor)");
  m.def("norm_backward_planes(Tensor g, Tensor u, Tensor sums, Tensor gain, Tensor? offset, Tensor mean, "
        "Tensor invstd, Tensor norm_weight, bool batch_stats) -> (Tensor, Tensor, Tensor)");
  m.def("norm_relu_forward(Tensor u, Tensor scale, Tensor shift) -> Tensor");
  m.def("norm_relu_backward(Tensor u, Tensor scale, Tensor shift, Tensor grad_y, Tensor mean, Tensor invstd, "
        "Tensor norm_weight, bool batch_stats) -> (Tensor, Tensor, Tensor)");
  m.def("affine_residual_(Tensor(a!) out, Tensor x, Tensor a, Tensor b, bool relu) -> Tensor(a!)");
  m.def("kcla_train_values(Tensor x, Tensor? hist, Tensor weight, Tensor gate, Tensor v_weight) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("kcla_train_backward(Tensor pre, Tensor shortcut, Tensor scale, Tensor shift, Tensor? hist, "
        "Tensor weight, Tensor gate, Tensor v_weight, Tensor a, Tensor b, Tensor? keep, Tensor mean, "
        "Tensor invstd, Tensor norm_weight, bool batch_stats, Tensor grad_out, Tensor? grad_hist) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("mrla_light_train_values(Tensor x, Tensor shortcut, Tensor gate, Tensor v_weight, Tensor lambda_t) "
        "-> (Tensor, Tensor)");
  m.def("mrla_light_train_backward(Tensor pre, Tensor shortcut, Tensor scale, Tensor shift, Tensor gate, "
        "Tensor v_weight, Tensor lambda_t, Tensor? keep, Tensor mean, Tensor invstd, Tensor norm_weight, "
        "bool batch_stats, Tensor grad_out, Tensor? lambda_input=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("dw_scale_add(Tensor r, Tensor m, Tensor w) -> Tensor");
  m.def("dw_scale_add_backward(Tensor grad, Tensor r, Tensor m, Tensor w) -> (Tensor, Tensor, Tensor)");
  m.def("mrla_base_train_values(Tensor x, Tensor[] values, Tensor weights, Tensor v_weight) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("mrla_base_train_backward(Tensor pre, Tensor shortcut, Tensor scale, Tensor shift, Tensor[] values, "
        "Tensor weights, Tensor v_weight, Tensor a, Tensor b, Tensor? keep, Tensor mean, Tensor invstd, "
        "Tensor norm_weight, bool batch_stats, Tensor grad_out, Tensor? grad_value) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(timm_layerattn, CPU, m) {
  m.impl("norm_plane_affine", norm_plane_affine);
  m.impl("channel_conv", channel_conv_op);
  m.impl("channel_conv_backward", channel_conv_backward_op);
  m.impl("plane_moments", plane_moments);
  m.impl("tail_forward", tail_forward);
  m.impl("tail_backward", tail_backward);
  m.impl("tail_grad_sums", tail_grad_sums);
  m.impl("norm_backward_planes", norm_backward_planes);
  m.impl("norm_relu_forward", norm_relu_forward);
  m.impl("norm_relu_backward", norm_relu_backward);
  m.impl("affine_residual_", affine_residual_);
  m.impl("kcla_train_values", kcla_train_values);
  m.impl("kcla_train_backward", kcla_train_backward);
  m.impl("mrla_light_train_values", mrla_light_train_values);
  m.impl("mrla_light_train_backward", mrla_light_train_backward);
  m.impl("dw_scale_add", dw_scale_add);
  m.impl("dw_scale_add_backward", dw_scale_add_backward);
  m.impl("mrla_base_train_values", mrla_base_train_values);
  m.impl("mrla_base_train_backward", mrla_base_train_backward);
}
