// ravit's fp32 CPU kernels for FAN inference; ravit/layers/cpu_kernels.py says why they exist, builds and loads them.
//
// ravit::dwconv_chain  FAN's MLP token mixer (FAN, arXiv 2204.12451, Sec. 3): 3x3 depthwise conv -> erf GELU ->
//                      BatchNorm (running statistics) -> 3x3 depthwise conv, times out_scale, optionally added into
//                      the output's memory, in one pass over the token map.
// ravit::channel_gate  the per-channel gate of FAN's channel attention (Sec. 3.2, Eq. 7 as released):
//                      tau_h * sigmoid(sum_n softmax_N(q)[n, c] * mean_{c' in head} softmax_N(k)[n, c']).
//
// Maps are (B, H, W, C) and token tensors (B, N, C), contiguous, so one channel block of one pixel is one aligned
// vector load. Work is split over (image, channel block) or (image, head): no two threads touch the same memory.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, the formula of ATen's own vectorised erf), with ATen's inline
// exp_u20 in place of a call into Sleef: the GELU is most of this kernel's arithmetic.
inline Vec erf(Vec x) {
  const Vec one(1.0f), p(0.3275911f);
  const Vec a1(0.254829592f), a2(-0.284496736f), a3(1.421413741f), a4(-1.453152027f), a5(1.061405429f);
  const Vec ax = x.abs();
  const Vec t = one / at::vec::fmadd(p, ax, one);
  const Vec poly = at::vec::fmadd(at::vec::fmadd(at::vec::fmadd(at::vec::fmadd(a5, t, a4), t, a3), t, a2), t, a1) * t;
  const Vec y = one - poly * (Vec(0.0f) - ax * ax).exp_u20();  // erf(|x|)
  return Vec::blendv(y, Vec(0.0f) - y, x < Vec(0.0f));
}

inline Vec gelu(Vec x) {
  return x * Vec(0.5f) * (Vec(1.0f) + erf(x * Vec(static_cast<float>(M_SQRT1_2))));
}

const float* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// Per-channel constants of one block of kCB channels starting at c, laid out [tap][channel] for vector loads.
template <int64_t kCB>
struct ChainParams {
  float w1[9][kCB], b1[kCB], scale[kCB], shift[kCB], w2[9][kCB], b2[kCB];
};

struct ChainArgs {
  const float *w1, *b1, *bn_weight, *bn_bias, *bn_mean, *bn_var, *w2, *b2, *out_scale;
  double eps;
};

template <int64_t kCB>
void chain_params(const ChainArgs& a, int64_t c, ChainParams<kCB>& p) {
  for (int64_t i = 0; i < kCB; ++i) {
    const int64_t ch = c + i;
    const float s = (a.bn_weight ? a.bn_weight[ch] : 1.0f) / std::sqrt(a.bn_var[ch] + static_cast<float>(a.eps));
    const float o = a.out_scale ? a.out_scale[ch] : 1.0f;
    p.scale[i] = s;
    p.shift[i] = (a.bn_bias ? a.bn_bias[ch] : 0.0f) - a.bn_mean[ch] * s;
    p.b1[i] = a.b1 ? a.b1[ch] : 0.0f;
    p.b2[i] = (a.b2 ? a.b2[ch] : 0.0f) * o;
    for (int k = 0; k < 9; ++k) {
      p.w1[k][i] = a.w1[ch * 9 + k];
      p.w2[k][i] = a.w2[ch * 9 + k] * o;
    }
  }
}

// acc = bias + the 3x3 taps around pixel (i, j) of a map whose pixel p starts at src + p * stride (zero outside);
// weights w[tap][lane]. Interior pixels take the unrolled nine taps, border pixels skip the taps outside.
template <int kNV>
inline void taps(const float* src, int64_t stride, const float (*w)[kNV * kLanes], const float* bias, int64_t i,
                 int64_t j, int64_t H, int64_t W, Vec* acc) {
  for (int v = 0; v < kNV; ++v) acc[v] = Vec::loadu(bias + v * kLanes);
  const bool interior = i > 0 && i + 1 < H && j > 0 && j + 1 < W;
  for (int64_t di = -1; di <= 1; ++di) {
    if (!interior && (i + di < 0 || i + di >= H)) continue;
    for (int64_t dj = -1; dj <= 1; ++dj) {
      if (!interior && (j + dj < 0 || j + dj >= W)) continue;
      const float* ps = src + ((i + di) * W + j + dj) * stride;
      const float* pw = w[(di + 1) * 3 + dj + 1];
      for (int v = 0; v < kNV; ++v) {
        acc[v] = at::vec::fmadd(Vec::loadu(pw + v * kLanes), Vec::loadu(ps + v * kLanes), acc[v]);
      }
    }
  }
}

// One image, channels [c, c + kNV lanes): g = BN(GELU(conv1(x))) into the scratch g (H, W, kCB), then
// out = [out +] conv2(g). Every read of x happens before the first write of out, so out may be x itself.
template <int kNV>
void chain_block(const float* x, float* out, float* g, int64_t H, int64_t W, int64_t C, int64_t c,
                 const ChainArgs& args, bool accumulate) {
  constexpr int64_t kCB = kNV * kLanes;
  ChainParams<kCB> p;
  chain_params<kCB>(args, c, p);
  for (int64_t i = 0; i < H; ++i) {
    for (int64_t j = 0; j < W; ++j) {
      if (i + 2 < H) {  // the row after next: its lines arrive while this row is computed (strided, unprefetched)
        for (int v = 0; v < kNV; ++v) __builtin_prefetch(x + ((i + 2) * W + j) * C + c + v * kLanes, 0, 3);
      }
      Vec acc[kNV];
      taps<kNV>(x + c, C, p.w1, p.b1, i, j, H, W, acc);
      float* pg = g + (i * W + j) * kCB;
      for (int v = 0; v < kNV; ++v) {
        at::vec::fmadd(gelu(acc[v]), Vec::loadu(p.scale + v * kLanes), Vec::loadu(p.shift + v * kLanes))
            .store(pg + v * kLanes);
      }
    }
  }
  for (int64_t i = 0; i < H; ++i) {
    for (int64_t j = 0; j < W; ++j) {
      Vec acc[kNV];
      taps<kNV>(g, kCB, p.w2, p.b2, i, j, H, W, acc);
      float* po = out + (i * W + j) * C + c;
      for (int v = 0; v < kNV; ++v) {
        (accumulate ? acc[v] + Vec::loadu(po + v * kLanes) : acc[v]).store(po + v * kLanes);
      }
    }
  }
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "ravit kernels: ", name,
              " must be a contiguous float32 CPU tensor");
}

void check_vector(const std::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return;
  check_float(*t, name);
  TORCH_CHECK(t->numel() == n, "ravit kernels: ", name, " must have ", n, " elements, got ", t->numel());
}

// x, out (B, H, W, C); conv weights (C, 1, 3, 3); biases, BatchNorm tensors and out_scale (C,).
void dwconv_chain(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                  const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                  const at::Tensor& bn_mean, const at::Tensor& bn_var, double eps, const at::Tensor& w2,
                  const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& out_scale, at::Tensor& out,
                  bool accumulate) {
  check_float(x, "x");
  check_float(out, "out");
  TORCH_CHECK(x.dim() == 4 && out.sizes() == x.sizes(), "ravit kernels: x and out must be (B, H, W, C) alike");
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  TORCH_CHECK(C % kLanes == 0, "ravit kernels: dwconv_chain needs a multiple of ", kLanes, " channels, got ", C);
  for (const auto* w : {&w1, &w2}) {
    check_float(*w, "conv weight");
    TORCH_CHECK(w->numel() == C * 9, "ravit kernels: conv weights must be (C, 1, 3, 3)");
  }
  check_vector(b1, C, "conv1 bias");
  check_vector(b2, C, "conv2 bias");
  check_vector(bn_weight, C, "bn weight");
  check_vector(bn_bias, C, "bn bias");
  check_vector(bn_mean, C, "bn running_mean");
  check_vector(bn_var, C, "bn running_var");
  check_vector(out_scale, C, "out_scale");
  const ChainArgs args{w1.data_ptr<float>(), data_or_null(b1), data_or_null(bn_weight), data_or_null(bn_bias),
                       bn_mean.data_ptr<float>(), bn_var.data_ptr<float>(), w2.data_ptr<float>(), data_or_null(b2),
                       data_or_null(out_scale), eps};
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // blocks of two vectors (their pixel's 2 x 64 bytes come in one go), and one single-vector block if C/kLanes is odd
  const int64_t pairs = C / (2 * kLanes), blocks = pairs + (C / kLanes) % 2;
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> g(H * W * 2 * kLanes);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / blocks, k = idx % blocks;
      const float* xb = xp + b * H * W * C;
      float* ob = op + b * H * W * C;
      if (k < pairs) {
        chain_block<2>(xb, ob, g.data(), H, W, C, k * 2 * kLanes, args, accumulate);
      } else {
        chain_block<1>(xb, ob, g.data(), H, W, C, pairs * 2 * kLanes, args, accumulate);
      }
    }
  });
}

// q, k (B, N, C); temperature (h,); out_scale (C,) or none; gate (B, C) <- tau_h * sigmoid(attn) [* out_scale].
void channel_gate(const at::Tensor& q, const at::Tensor& k, const at::Tensor& temperature,
                  const std::optional<at::Tensor>& out_scale, at::Tensor& gate) {
  check_float(q, "q");
  check_float(k, "k");
  check_float(temperature, "temperature");
  check_float(gate, "gate");
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes(), "ravit kernels: q and k must be (B, N, C) alike");
  const int64_t B = q.size(0), N = q.size(1), C = q.size(2), h = temperature.numel();
  TORCH_CHECK(h > 0 && C % h == 0 && gate.numel() == B * C, "ravit kernels: channel_gate shapes do not match");
  check_vector(out_scale, C, "out_scale");
  const int64_t d = C / h;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *tp = temperature.data_ptr<float>();
  const float* sp = data_or_null(out_scale);
  float* gp = gate.data_ptr<float>();
  at::parallel_for(0, B * h, 1, [&](int64_t begin, int64_t end) {
    // this head's exponentials (N, d) of q and k, their column maxima and sums, and k's head mean per token
    std::vector<float> eq(N * d), ek(N * d), mq(d), mk(d), sq(d), sk(d), kbar(N);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / h, head = idx % h, c0 = head * d;
      const float* qb = qp + b * N * C + c0;
      const float* kb = kp + b * N * C + c0;
      for (int64_t c = 0; c < d; c += kLanes) {  // softmax over tokens, per channel: maxima, exponentials, sums
        const int n = static_cast<int>(std::min(kLanes, d - c));
        Vec m1(-INFINITY), m2(-INFINITY);
        for (int64_t t = 0; t < N; ++t) {
          m1 = at::vec::maximum(m1, Vec::loadu(qb + t * C + c, n));
          m2 = at::vec::maximum(m2, Vec::loadu(kb + t * C + c, n));
        }
        Vec s1(0.0f), s2(0.0f);
        for (int64_t t = 0; t < N; ++t) {
          const Vec e1 = (Vec::loadu(qb + t * C + c, n) - m1).exp_u20();
          const Vec e2 = (Vec::loadu(kb + t * C + c, n) - m2).exp_u20();
          e1.store(eq.data() + t * d + c, n);
          e2.store(ek.data() + t * d + c, n);
          s1 = s1 + Vec::set(Vec(0.0f), e1, n);
          s2 = s2 + Vec::set(Vec(0.0f), e2, n);
        }
        s1.store(sq.data() + c, n);
        s2.store(sk.data() + c, n);
      }
      for (int64_t c = 0; c < d; ++c) sk[c] = 1.0f / (sk[c] * static_cast<float>(d));
      for (int64_t t = 0; t < N; ++t) {  // mean over the head's channels of softmax_N(k)
        float acc = 0.0f;
        for (int64_t c = 0; c < d; ++c) acc += ek[t * d + c] * sk[c];
        kbar[t] = acc;
      }
      const Vec tau(tp[head]);
      for (int64_t c = 0; c < d; c += kLanes) {
        const int n = static_cast<int>(std::min(kLanes, d - c));
        Vec acc(0.0f);
        for (int64_t t = 0; t < N; ++t) acc = at::vec::fmadd(Vec::loadu(eq.data() + t * d + c, n), Vec(kbar[t]), acc);
        acc = acc / Vec::set(Vec(1.0f), Vec::loadu(sq.data() + c, n), n);  // lanes past d divide by 1
        Vec out = tau / (Vec(1.0f) + acc.neg().exp());
        if (sp) out = out * Vec::loadu(sp + c0 + c, n);
        out.store(gp + b * C + c0 + c, n);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(ravit, m) {
  m.def(
      "dwconv_chain(Tensor x, Tensor w1, Tensor? b1, Tensor? bn_weight, Tensor? bn_bias, Tensor bn_mean, "
      "Tensor bn_var, float eps, Tensor w2, Tensor? b2, Tensor? out_scale, Tensor(a!) out, bool accumulate) -> ()");
  m.def("channel_gate(Tensor q, Tensor k, Tensor temperature, Tensor? out_scale, Tensor(a!) gate) -> ()");
}

TORCH_LIBRARY_IMPL(ravit, CPU, m) {
  m.impl("dwconv_chain", &dwconv_chain);
  m.impl("channel_gate", &channel_gate);
}
