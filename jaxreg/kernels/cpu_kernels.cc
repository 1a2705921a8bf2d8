// jaxreg's CPU kernels (built on first use and registered with XLA by jaxreg/kernels/cpu.py).
//
// Two XLA FFI handlers, both float32, both splitting their work over XLA's intra-op
// thread pool:
//
// JaxregWarpSsd(moving, fixed, disp) -> (sq, grad)
//   moving, fixed: (..., H, W, D, C); disp: (..., H, W, D, 3). Per voxel
//   x, with r = moving(x + disp(x)) - fixed(x) (trilinear, zero padding, exactly
//   the corner weights and slopes of :func:`jaxreg.warping._corner_setup`):
//   sq = sum_c r_c**2 and grad_a = sum_c r_c * d moving_c(x + disp) / d disp_a.
//
// JaxregBoxSmooth(x; width, times) -> y
//   x: (..., H, W, D, K). times centred box filters of width voxels along
//   each spatial axis, zero padding, each sum divided by width: what times
//   applications of :func:`jaxreg.filters.box_filter` give (filters along different axes
//   commute), in one read and write of the array per axis.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ----------------------------------------------------------------------- threads
// Tasks are claimed from a counter by the calling thread and by helpers scheduled on
// XLA's pool. The caller waits only for tasks already claimed, so a helper that starts
// late (or never, on a busy pool) cannot block it; a late helper finds nothing to do.
struct Tasks {
  std::function<void(int64_t)> run;
  int64_t count = 0;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable cv;
};

void Drain(Tasks& t) {
  for (;;) {
    const int64_t i = t.next.fetch_add(1);
    if (i >= t.count) return;
    t.run(i);
    if (t.done.fetch_add(1) + 1 == t.count) {
      std::lock_guard<std::mutex> lock(t.mu);
      t.cv.notify_all();
    }
  }
}

void ParallelFor(ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> run) {
  if (count <= 0) return;
  auto t = std::make_shared<Tasks>();
  t->run = std::move(run);
  t->count = count;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([t] { Drain(*t); });
  Drain(*t);
  std::unique_lock<std::mutex> lock(t->mu);
  t->cv.wait(lock, [&] { return t->done.load() == t->count; });
}

// ----------------------------------------------------------------------- warp + SSD
typedef float v4 __attribute__((vector_size(16)));

inline v4 Load4(const float* p) { v4 r; std::memcpy(&r, p, sizeof(r)); return r; }
inline float Sum4(v4 x) { return (x[0] + x[1]) + (x[2] + x[3]); }

// Channels [c, c + 4) of one point: warped value and its three derivatives from the
// eight corner rows, the residual against `fixed`, accumulated into `acc` (sum r^2, then
// sum r * derivative per axis).
inline void Channels4(const float* const* rows, const float* w, const float* s0,
                      const float* s1, const float* s2, const float* fixed, int64_t c,
                      v4* acc) {
  v4 v = {}, d0 = {}, d1 = {}, d2 = {};
  for (int t = 0; t < 8; ++t) {
    const v4 m = Load4(rows[t] + c);
    v += w[t] * m; d0 += s0[t] * m; d1 += s1[t] * m; d2 += s2[t] * m;
  }
  const v4 r = v - Load4(fixed + c);
  acc[0] += r * r; acc[1] += r * d0; acc[2] += r * d1; acc[3] += r * d2;
}

// One axis of a trilinear cell: clamped indices, weights and slopes, zero padding
// folded in (a corner outside the volume has weight 0 and slope 0).
struct Axis { int64_t lo, hi; float wlo, whi, slo, shi; };

inline Axis MakeAxis(float x, int64_t n) {
  const float base = std::floor(x);
  const float frac = x - base;
  // Far outside (or NaN) reads zero whatever the index: bound it before the cast.
  const int64_t b = (int64_t)(base > 1e9f ? 1e9f : (base >= -1e9f ? base : -1e9f));
  const float lo_ok = (b >= 0 && b < n) ? 1.f : 0.f;
  const float hi_ok = (b >= -1 && b < n - 1) ? 1.f : 0.f;
  Axis a;
  a.lo = std::min(std::max<int64_t>(b, 0), n - 1);
  a.hi = std::min(std::max<int64_t>(b + 1, 0), n - 1);
  a.wlo = (1.f - frac) * lo_ok;
  a.whi = frac * hi_ok;
  a.slo = -lo_ok;
  a.shi = hi_ok;
  return a;
}

struct Warp {
  const float* moving; const float* fixed; const float* disp;
  float* sq; float* grad;
  int64_t H, W, D, C, points;  // points per volume
};

template <int kC>
void WarpPoints(const Warp& p, int64_t begin, int64_t end) {
  const int64_t C = kC > 0 ? kC : p.C;
  const int64_t sx = p.W * p.D * C, sy = p.D * C;
  // Voxel (batch, i, j, k) of point g, stepped along k (no division per point).
  int64_t n = begin % p.points, batch = begin / p.points;
  int64_t i = n / (p.W * p.D), j = (n / p.D) % p.W, k = n % p.D;
  for (int64_t g = begin; g < end; ++g) {
    const float* u = p.disp + 3 * g;
    const Axis ax = MakeAxis(i + u[0], p.H), ay = MakeAxis(j + u[1], p.W),
               az = MakeAxis(k + u[2], p.D);
    const float* volume = p.moving + batch * p.points * C;
    const float* rows[8];
    float w[8], s0[8], s1[8], s2[8];
    int q = 0;
    for (int cx = 0; cx < 2; ++cx)
      for (int cy = 0; cy < 2; ++cy)
        for (int cz = 0; cz < 2; ++cz, ++q) {
          const float wx = cx ? ax.whi : ax.wlo, wy = cy ? ay.whi : ay.wlo,
                      wz = cz ? az.whi : az.wlo;
          rows[q] = volume + (cx ? ax.hi : ax.lo) * sx + (cy ? ay.hi : ay.lo) * sy +
                    (cz ? az.hi : az.lo) * C;
          w[q] = wx * wy * wz;
          s0[q] = (cx ? ax.shi : ax.slo) * wy * wz;
          s1[q] = (cy ? ay.shi : ay.slo) * wz * wx;
          s2[q] = (cz ? az.shi : az.slo) * wx * wy;
        }
    const float* f = p.fixed + g * C;
    v4 acc[4] = {};
    int64_t c = 0;
    for (; c + 4 <= C; c += 4) Channels4(rows, w, s0, s1, s2, f, c, acc);
    float out[4] = {Sum4(acc[0]), Sum4(acc[1]), Sum4(acc[2]), Sum4(acc[3])};
    for (; c < C; ++c) {
      float v = 0.f, d0 = 0.f, d1 = 0.f, d2 = 0.f;
      for (int t = 0; t < 8; ++t) {
        const float m = rows[t][c];
        v += w[t] * m; d0 += s0[t] * m; d1 += s1[t] * m; d2 += s2[t] * m;
      }
      const float r = v - f[c];
      out[0] += r * r; out[1] += r * d0; out[2] += r * d1; out[3] += r * d2;
    }
    p.sq[g] = out[0];
    p.grad[3 * g] = out[1]; p.grad[3 * g + 1] = out[2]; p.grad[3 * g + 2] = out[3];
    if (++k == p.D) {
      k = 0;
      if (++j == p.W) {
        j = 0;
        if (++i == p.H) { i = 0; ++batch; }
      }
    }
  }
}

ffi::Error WarpSsdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> moving,
                       ffi::Buffer<ffi::F32> fixed, ffi::Buffer<ffi::F32> disp,
                       ffi::ResultBuffer<ffi::F32> sq, ffi::ResultBuffer<ffi::F32> grad) {
  const auto dims = moving.dimensions();
  const size_t rank = dims.size();
  if (rank < 4 || fixed.element_count() != moving.element_count())
    return ffi::Error::InvalidArgument("moving and fixed must be (..., H, W, D, C)");
  Warp p;
  p.H = dims[rank - 4]; p.W = dims[rank - 3]; p.D = dims[rank - 2]; p.C = dims[rank - 1];
  p.points = p.H * p.W * p.D;
  if (p.points == 0 || p.C == 0) return ffi::Error::Success();
  const int64_t total = static_cast<int64_t>(moving.element_count()) / p.C;
  if (static_cast<int64_t>(disp.element_count()) != 3 * total)
    return ffi::Error::InvalidArgument("disp must be (..., H, W, D, 3) on moving's grid");
  p.moving = moving.typed_data(); p.fixed = fixed.typed_data(); p.disp = disp.typed_data();
  p.sq = sq->typed_data(); p.grad = grad->typed_data();
  const int64_t chunk = 4096;
  ParallelFor(pool, (total + chunk - 1) / chunk, [&](int64_t t) {
    const int64_t begin = t * chunk, end = std::min(total, begin + chunk);
    if (p.C == 12) WarpPoints<12>(p, begin, end);
    else WarpPoints<0>(p, begin, end);
  });
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------- box smoothing
// One box filter along the rows of a buffer of n rows of b floats (row stride b):
// out[i] = (a[i - half] + ... + a[i + half]) * (1 / width) over the rows inside, summed
// in that order (zero padding; XLA also multiplies by the reciprocal). Each tap is one
// contiguous, vectorised loop over the rows it reaches; the last one also scales.
void BoxRows(const float* a, float* out, int64_t n, int64_t b, int64_t half, float inv) {
  const int64_t h = std::min(half, n);
  std::fill(out, out + h * b, 0.f);
  std::copy(a, a + (n - h) * b, out + h * b);  // tap -half: 0 + x is x
  for (int64_t d = -half + 1; d <= half; ++d) {
    const int64_t lo = std::max<int64_t>(0, -d), hi = std::min(n, n - d);  // rows i: i + d inside
    float* o = out + lo * b;
    const float* in = a + (lo + d) * b;
    const int64_t len = std::max<int64_t>(0, hi - lo) * b;
    if (d < half) {
      for (int64_t m = 0; m < len; ++m) o[m] += in[m];
    } else {
      for (int64_t m = 0; m < len; ++m) o[m] = (o[m] + in[m]) * inv;
      for (int64_t m = std::max<int64_t>(0, hi) * b; m < n * b; ++m) out[m] *= inv;
    }
  }
  if (half == 0)
    for (int64_t m = 0; m < n * b; ++m) out[m] *= inv;
}

// One axis: the array as (outer, n, inner), `times` box filters along n. Blocks of
// `inner` (all of it when short: then a block is one contiguous slab) are copied into a
// per-thread buffer, filtered there and written back.
void SmoothAxis(ffi::ThreadPool& pool, float* x, int64_t outer, int64_t n, int64_t inner,
                int64_t width, int64_t times) {
  const int64_t block = inner <= 1024 ? inner : 256;
  const int64_t blocks = (inner + block - 1) / block;
  const int64_t per_task = std::max<int64_t>(1, 32768 / (n * block));  // outer rows
  const int64_t tasks = ((outer + per_task - 1) / per_task) * blocks;
  const float inv = 1.f / static_cast<float>(width);
  ParallelFor(pool, tasks, [=](int64_t t) {
    const int64_t o0 = (t / blocks) * per_task, e0 = (t % blocks) * block;
    const int64_t b = std::min(block, inner - e0);
    thread_local std::vector<float> a, c;
    a.resize(n * b);
    c.resize(n * b);
    for (int64_t o = o0; o < std::min(outer, o0 + per_task); ++o) {
      float* base = x + o * n * inner + e0;
      if (b == inner) std::memcpy(a.data(), base, n * b * 4);
      else for (int64_t i = 0; i < n; ++i) std::memcpy(&a[i * b], base + i * inner, b * 4);
      for (int64_t rep = 0; rep < times; ++rep) {
        BoxRows(a.data(), c.data(), n, b, width / 2, inv);
        a.swap(c);
      }
      if (b == inner) std::memcpy(base, a.data(), n * b * 4);
      else for (int64_t i = 0; i < n; ++i) std::memcpy(base + i * inner, &a[i * b], b * 4);
    }
  });
}

ffi::Error BoxSmoothImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::ResultBuffer<ffi::F32> y, int64_t width, int64_t times) {
  const auto dims = x.dimensions();
  const size_t rank = dims.size();
  if (rank < 4) return ffi::Error::InvalidArgument("x must be (..., H, W, D, K)");
  const int64_t total = static_cast<int64_t>(x.element_count());
  float* out = y->typed_data();
  std::memcpy(out, x.typed_data(), total * sizeof(float));
  if (total == 0 || times == 0) return ffi::Error::Success();
  const int64_t H = dims[rank - 4], W = dims[rank - 3], D = dims[rank - 2], K = dims[rank - 1];
  const int64_t batch = total / (H * W * D * K);
  SmoothAxis(pool, out, batch, H, W * D * K, width, times);
  SmoothAxis(pool, out, batch * H, W, D * K, width, times);
  SmoothAxis(pool, out, batch * H * W, D, K, width, times);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregWarpSsd, WarpSsdImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregBoxSmooth, BoxSmoothImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<int64_t>("width")
        .Attr<int64_t>("times"));
