// ravit's fp32 CPU kernels for ATS's static Top-K; ravit/ats/cpu_select.py says why they exist, and
// ravit/layers/cpu_kernels.py builds them into one library with FAN's kernels.
//
// ravit::topk_select   the selection of static Top-K on images whose slots are all filled (ravit/ats/padded.py,
//                      filled_topk_forward): class-attention x value-norm scores (ATS, arXiv 2111.15667, Sec. 3.1,
//                      Eq. 3), the redundancy discount (ravit.ats.sampling.redundancy_discount), the stable Top-K, the
//                      kept slots gathered, and each dropped token's most similar kept token for fusion.
// ravit::fuse_nearest  the size-weighted average of the dropped tokens into those kept tokens (ToMe, Bolya et al.,
//                      ICLR 2023, Sec. 3), in place.
//
// Every similarity is one row against vectors of columns, summed over the feature axis in the same order for every
// pair, so equal tokens get bit-equal scores and similarities, and ties go to the earlier token as torch's stable
// sort and max give them.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// out[c] = sum_d row[d] * cols[d * ld + c] for the n columns of a (D, ld) matrix, four vectors of columns at a time
// (four independent accumulator chains), the last ones in partial vectors.
void row_dots(const float* row, const float* cols, int64_t ld, int64_t D, int64_t n, float* out) {
  int64_t c = 0;
  for (; c + 4 * kLanes <= n; c += 4 * kLanes) {
    Vec a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f);
    for (int64_t d = 0; d < D; ++d) {
      const Vec r(row[d]);
      const float* p = cols + d * ld + c;
      a0 = at::vec::fmadd(r, Vec::loadu(p), a0);
      a1 = at::vec::fmadd(r, Vec::loadu(p + kLanes), a1);
      a2 = at::vec::fmadd(r, Vec::loadu(p + 2 * kLanes), a2);
      a3 = at::vec::fmadd(r, Vec::loadu(p + 3 * kLanes), a3);
    }
    a0.store(out + c);
    a1.store(out + c + kLanes);
    a2.store(out + c + 2 * kLanes);
    a3.store(out + c + 3 * kLanes);
  }
  for (; c < n; c += kLanes) {
    const int64_t m = std::min(kLanes, n - c);
    Vec a(0.0f);
    for (int64_t d = 0; d < D; ++d) {
      a = at::vec::fmadd(Vec(row[d]), Vec::loadu(cols + d * ld + c, m), a);
    }
    a.store(out + c, m);
  }
}

// row_dots for two rows at once: every column vector loaded once for both.
void row_dots2(const float* row_a, const float* row_b, const float* cols, int64_t ld, int64_t D, int64_t n,
               float* out_a, float* out_b) {
  int64_t c = 0;
  for (; c + 2 * kLanes <= n; c += 2 * kLanes) {
    Vec a0(0.0f), a1(0.0f), b0(0.0f), b1(0.0f);
    for (int64_t d = 0; d < D; ++d) {
      const Vec ra(row_a[d]), rb(row_b[d]);
      const Vec c0 = Vec::loadu(cols + d * ld + c), c1 = Vec::loadu(cols + d * ld + c + kLanes);
      a0 = at::vec::fmadd(ra, c0, a0);
      a1 = at::vec::fmadd(ra, c1, a1);
      b0 = at::vec::fmadd(rb, c0, b0);
      b1 = at::vec::fmadd(rb, c1, b1);
    }
    a0.store(out_a + c);
    a1.store(out_a + c + kLanes);
    b0.store(out_b + c);
    b1.store(out_b + c + kLanes);
  }
  for (; c < n; c += kLanes) {
    const int64_t m = std::min(kLanes, n - c);
    Vec a(0.0f), b(0.0f);
    for (int64_t d = 0; d < D; ++d) {
      const Vec col = Vec::loadu(cols + d * ld + c, m);
      a = at::vec::fmadd(Vec(row_a[d]), col, a);
      b = at::vec::fmadd(Vec(row_b[d]), col, b);
    }
    a.store(out_a + c, m);
    b.store(out_b + c, m);
  }
}

// The dot product of two D-vectors, in vectors of kLanes (the last one partial) summed across lanes at the end.
float dot(const float* a, const float* b, int64_t D) {
  Vec acc(0.0f);
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) acc = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), acc);
  if (d < D) acc = at::vec::fmadd(Vec::loadu(a + d, D - d), Vec::loadu(b + d, D - d), acc);
  return at::vec::vec_reduce_all<float>([](Vec& u, Vec& w) { return u + w; }, acc);
}

// The largest of n >= 1 values and 0.
float max_with_zero(const float* a, int64_t n) {
  Vec top(0.0f);
  for (int64_t c = 0; c < n; c += kLanes) top = at::vec::maximum(top, Vec::loadu(a + c, std::min(kLanes, n - c)));
  return at::vec::vec_reduce_all<float>([](Vec& u, Vec& w) { return at::vec::maximum(u, w); }, top);
}

// Descending order for a stable sort, NaN first (as torch.sort(descending=True) puts it): a strict weak order.
inline bool ranks_before(float a, float b) {
  return (std::isnan(a) && !std::isnan(b)) || a > b;
}

std::vector<int64_t> rank_descending(const std::vector<float>& s) {
  std::vector<int64_t> order(s.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ranks_before(s[a], s[b]); });
  return order;
}

// One image's (H, L, D) queries, keys or values: its first element and the strides of a head and of a slot (unit
// stride along D).
struct Heads {
  const float* p;
  int64_t head, slot;
  const float* at(int64_t h, int64_t j) const { return p + h * head + j * slot; }
};

Heads heads(const Tensor& t, int64_t b) {
  return {t.data_ptr<float>() + b * t.stride(0), t.stride(1), t.stride(2)};
}

// The class token's attention summed over heads, times the value norm over all channels (Eq. 3), for the L slots.
std::vector<float> class_scores(const Heads& q, const Heads& k, const Heads& v, int64_t H, int64_t L, int64_t D,
                                const float* bias, float scale, bool value_norm) {
  std::vector<float> scores(L, 0.0f), logits(L);
  for (int64_t h = 0; h < H; ++h) {
    float top = -INFINITY;
    for (int64_t j = 0; j < L; ++j) {
      logits[j] = dot(q.at(h, 0), k.at(h, j), D) * scale + (bias ? bias[j] : 0.0f);
      top = std::max(top, logits[j]);
    }
    float total = 0.0f;
    for (int64_t j = 0; j < L; j += kLanes) {  // a softmax over the slots
      const int64_t n = std::min(kLanes, L - j);
      (Vec::loadu(logits.data() + j, n) - Vec(top)).exp().store(logits.data() + j, n);
      for (int64_t i = j; i < j + n; ++i) total += logits[i];
    }
    for (int64_t j = 0; j < L; ++j) scores[j] += logits[j] / total;
  }
  if (value_norm) {
    const bool rows = v.head == D;  // the heads of one slot side by side (timm's fused qkv): one dot product
    for (int64_t j = 0; j < L; ++j) {
      float sq = 0.0f;
      if (rows) {
        sq = dot(v.at(0, j), v.at(0, j), H * D);
      } else {
        for (int64_t h = 0; h < H; ++h) sq += dot(v.at(h, j), v.at(h, j), D);
      }
      scores[j] *= std::sqrt(sq);
    }
  }
  return scores;
}

// (N, D) unit vectors of the patch slots' keys averaged over heads (row-major), ravit.ats.padded._metric.
std::vector<float> key_metric(const Heads& k, int64_t H, int64_t P, int64_t N, int64_t D) {
  std::vector<float> m(N * D, 0.0f);
  for (int64_t j = 0; j < N; ++j) {
    float* mj = m.data() + j * D;
    for (int64_t h = 0; h < H; ++h) {
      const float* k_hj = k.at(h, P + j);
      for (int64_t d = 0; d < D; ++d) mj[d] += k_hj[d];
    }
    for (int64_t d = 0; d < D; ++d) mj[d] /= H;
    const float norm = std::max(std::sqrt(dot(mj, mj, D)), 1e-12f);
    for (int64_t d = 0; d < D; ++d) mj[d] /= norm;
  }
  return m;
}

// (D, n) columns: rows `pick` of the (N, D) metric, transposed.
std::vector<float> columns(const std::vector<float>& m, int64_t D, const int64_t* pick, int64_t n) {
  std::vector<float> t(D * n);
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t d = 0; d < D; ++d) t[d * n + c] = m[pick[c] * D + d];
  }
  return t;
}

// scores[i] *= (1 - c_i)^gamma, c_i the largest similarity to a token ranked above i, clamped to [0, 1].
void redundancy_discount(std::vector<float>& scores, const std::vector<float>& m, int64_t D, double gamma) {
  const int64_t N = static_cast<int64_t>(scores.size());
  const std::vector<int64_t> order = rank_descending(scores);
  const std::vector<float> ranked = columns(m, D, order.data(), N);  // (D, N) in rank order
  std::vector<float> discount(N, 1.0f);
  // Rows r and r + 1 against the columns ranked above r + 1 share every column load; row r ignores its own column.
  // Threads take every other pair of rows, so that the triangle's work splits evenly (one thread inside a batch's
  // parallel loop over images).
  const int64_t pairs = N / 2, threads = N >= 96 && !at::in_parallel_region() ? at::get_num_threads() : 1;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sims(2 * N);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t p = t; p < pairs; p += threads) {
        const int64_t r = 2 * p + 1, i = order[r], i2 = r + 1 < N ? order[r + 1] : i;
        row_dots2(m.data() + i * D, m.data() + i2 * D, ranked.data(), N, D, r + 1, sims.data(), sims.data() + N);
        discount[i] = std::pow(1.0f - std::min(max_with_zero(sims.data(), r), 1.0f), static_cast<float>(gamma));
        if (r + 1 < N) {
          discount[i2] = std::pow(1.0f - std::min(max_with_zero(sims.data() + N, r + 1), 1.0f),
                                  static_cast<float>(gamma));
        }
      }
    }
  });
  for (int64_t i = 0; i < N; ++i) scores[i] *= discount[i];
}

void check_heads(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 4 && t.size(0) == x.size(0) && t.size(2) == x.size(1) && t.stride(3) == 1, name,
              " must be (B, H, L, D) with unit stride along D");
}

void check_slots(const Tensor& t, const Tensor& x, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1) && t.scalar_type() == dtype, name,
              " must be (B, L) ", dtype);
}

// Returns index (B, P + width): the prefix slots then each image's kept patch slots in input order; the kept slots'
// q (B, H, P + width, D), x (B, P + width, C), size and ids; with fuse, each image's dropped slots (B, N - width, in
// rank order), the kept slot (in the output) each is fused into and the (B, L) log sizes (proportional attention,
// also in the scores), else three empty tensors. Images are independent: a parallel loop over them.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> topk_select(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& x, const Tensor& size, const Tensor& ids,
    double scale, int64_t num_prefix, int64_t width, bool value_norm, double redundancy, bool fuse) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.scalar_type() == at::kFloat,
              "x must be (B, L, C) float32 with unit stride along C");
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2), P = num_prefix, N = L - P;
  check_heads(q, x, "q");
  check_heads(k, x, "k");
  check_heads(v, x, "v");
  TORCH_CHECK(q.sizes() == k.sizes() && k.sizes() == v.sizes(), "q, k and v must have one shape");
  check_slots(size, x, at::kFloat, "size");
  check_slots(ids, x, at::kLong, "ids");
  TORCH_CHECK(P >= 1 && 1 <= width && width <= N, "need 1 <= num_prefix and 1 <= width <= ", N, " patch slots");
  const int64_t H = k.size(1), D = k.size(3), W = P + width, M = fuse ? N - width : 0;

  auto longs = x.options().dtype(at::kLong);
  Tensor index = at::empty({B, W}, longs), q_kept = at::empty({B, H, W, D}, q.options());
  Tensor x_kept = at::empty({B, W, C}, x.options()), size_kept = at::empty({B, W}, size.options());
  Tensor ids_kept = at::empty({B, W}, longs), dropped = at::empty({B, M}, longs), target = at::empty({B, M}, longs);
  Tensor log_size = at::empty({fuse ? B : 0, fuse ? L : 0}, size.options());
  const int64_t qh = q.stride(1), qj = q.stride(2), xj = x.stride(1);
  const float *sp = size.data_ptr<float>(), *xp = x.data_ptr<float>();
  const int64_t* idp = ids.data_ptr<int64_t>();

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* size_b = sp + b * size.stride(0);
      float* bias = fuse ? log_size.data_ptr<float>() + b * L : nullptr;
      for (int64_t j = 0; fuse && j < L; ++j) bias[j] = std::log(size_b[j * size.stride(1)]);
      const Heads kb = heads(k, b);
      const std::vector<float> all = class_scores(heads(q, b), kb, heads(v, b), H, L, D, bias,
                                                  static_cast<float>(scale), value_norm);
      std::vector<float> scores(all.begin() + P, all.end());  // (N,) the patch slots'
      std::vector<float> m;
      if (fuse || redundancy != 0.0) m = key_metric(kb, H, P, N, D);
      if (redundancy != 0.0) redundancy_discount(scores, m, D, redundancy);
      const std::vector<int64_t> ranked = rank_descending(scores);
      std::vector<int64_t> kept(ranked.begin(), ranked.begin() + width);
      std::sort(kept.begin(), kept.end());

      int64_t* ix = index.data_ptr<int64_t>() + b * W;
      for (int64_t s = 0; s < W; ++s) ix[s] = s < P ? s : kept[s - P] + P;
      const float* q_b = q.data_ptr<float>() + b * q.stride(0);
      float* q_out = q_kept.data_ptr<float>() + b * H * W * D;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t s = 0; s < W; ++s) {
          std::memcpy(q_out + (h * W + s) * D, q_b + h * qh + ix[s] * qj, D * sizeof(float));
        }
      }
      float *x_out = x_kept.data_ptr<float>() + b * W * C, *s_out = size_kept.data_ptr<float>() + b * W;
      int64_t* id_out = ids_kept.data_ptr<int64_t>() + b * W;
      for (int64_t s = 0; s < W; ++s) {
        std::memcpy(x_out + s * C, xp + b * x.stride(0) + ix[s] * xj, C * sizeof(float));
        s_out[s] = size_b[ix[s] * size.stride(1)];
        id_out[s] = idp[b * ids.stride(0) + ix[s] * ids.stride(1)];
      }
      if (M == 0) continue;
      const std::vector<float> cols = columns(m, D, kept.data(), width);  // (D, width)
      std::vector<float> sims(width);
      int64_t *drop_out = dropped.data_ptr<int64_t>() + b * M, *target_out = target.data_ptr<int64_t>() + b * M;
      for (int64_t j = 0; j < M; ++j) {
        const int64_t i = ranked[width + j];
        row_dots(m.data() + i * D, cols.data(), width, D, width, sims.data());
        int64_t best = 0;  // first maximum; a NaN wins, as torch.max propagates it
        for (int64_t c = 1; c < width && !std::isnan(sims[best]); ++c) {
          if (std::isnan(sims[c]) || sims[c] > sims[best]) best = c;
        }
        drop_out[j] = i + P;
        target_out[j] = best + P;
      }
    }
  });
  return {index, q_kept, x_kept, size_kept, ids_kept, dropped, target, log_size};
}

// x[t] <- (size[t] x[t] + sum_j w_j x_in[j]) / (size[t] + sum_j w_j) over each image's dropped slots j fused into
// t, the weights w_j = size_in[j]; x (B, W, C) contiguous, updated in place; returns the new (B, W) sizes.
Tensor fuse_nearest(Tensor x, const Tensor& size, const Tensor& x_in, const Tensor& size_in, const Tensor& dropped,
                    const Tensor& target) {
  TORCH_CHECK(x.is_contiguous() && x.dim() == 3 && x.scalar_type() == at::kFloat,
              "x must be (B, W, C) contiguous float32");
  const int64_t B = x.size(0), W = x.size(1), C = x.size(2), L = x_in.size(1);
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(0) == B && x_in.size(2) == C && x_in.stride(2) == 1 &&
              x_in.scalar_type() == at::kFloat, "x_in must be (B, L, C) float32 with unit stride along C");
  TORCH_CHECK(size.is_contiguous() && size.dim() == 2 && size.size(0) == B && size.size(1) == W &&
              size.scalar_type() == at::kFloat, "size must be (B, W) contiguous float32");
  TORCH_CHECK(size_in.is_contiguous() && size_in.dim() == 2 && size_in.size(0) == B && size_in.size(1) == L &&
              size_in.scalar_type() == at::kFloat, "size_in must be (B, L) contiguous float32");
  TORCH_CHECK(dropped.is_contiguous() && target.is_contiguous() && dropped.dim() == 2 && dropped.size(0) == B &&
              target.sizes() == dropped.sizes() && dropped.scalar_type() == at::kLong &&
              target.scalar_type() == at::kLong, "dropped and target must be (B, M) int64 of one shape");
  const int64_t M = dropped.size(1);
  const int64_t *drop = dropped.data_ptr<int64_t>(), *into = target.data_ptr<int64_t>();
  for (int64_t j = 0; j < B * M; ++j) {
    TORCH_CHECK(0 <= drop[j] && drop[j] < L && 0 <= into[j] && into[j] < W, "dropped or target out of range");
  }
  Tensor out = size.clone();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t *d = drop + b * M, *t = into + b * M;
      const float *w = size_in.data_ptr<float>() + b * L, *s0 = size.data_ptr<float>() + b * W;
      const float* src_b = x_in.data_ptr<float>() + b * x_in.stride(0);
      float *s = out.data_ptr<float>() + b * W, *xs = x.data_ptr<float>() + b * W * C;
      for (int64_t j = 0; j < M; ++j) s[t[j]] += w[d[j]];
      for (int64_t r = 0; r < W; ++r) {
        if (s[r] == s0[r]) continue;
        const float keep = s0[r] / s[r];
        int64_t c = 0;
        for (; c + kLanes <= C; c += kLanes) (Vec::loadu(xs + r * C + c) * Vec(keep)).store(xs + r * C + c);
        for (; c < C; ++c) xs[r * C + c] *= keep;
      }
      for (int64_t j = 0; j < M; ++j) {
        const float pull = w[d[j]] / s[t[j]];
        const float* src = src_b + d[j] * x_in.stride(1);
        float* dst = xs + t[j] * C;
        int64_t c = 0;
        for (; c + kLanes <= C; c += kLanes) {
          at::vec::fmadd(Vec(pull), Vec::loadu(src + c), Vec::loadu(dst + c)).store(dst + c);
        }
        for (; c < C; ++c) dst[c] += pull * src[c];
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ravit, m) {
  m.def(
      "topk_select(Tensor q, Tensor k, Tensor v, Tensor x, Tensor size, Tensor ids, float scale, int num_prefix, "
      "int width, bool value_norm, float redundancy, bool fuse) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("fuse_nearest(Tensor(a!) x, Tensor size, Tensor x_in, Tensor size_in, Tensor dropped, Tensor target) -> Tensor");
}

TORCH_LIBRARY_IMPL(ravit, CPU, m) {
  m.impl("topk_select", &topk_select);
  m.impl("fuse_nearest", &fuse_nearest);
}
