// mlx-video native CPU kernels: see kernels.h.
#include "kernels.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <thread>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlx_video {

// ------------------------------------------------------------------------------------------------
// BLAS and threads
// ------------------------------------------------------------------------------------------------

namespace {

// CBLAS enums by value (cblas.h is not shipped with every BLAS wheel).
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using sgemm_fn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float,
                          float*, int);
using set_threads_local_fn = int (*)(int);

// Resolved at run time from the process's global symbols: mlx_video/blas.py loads MKL (or OpenBLAS)
// with RTLD_GLOBAL before MLX, which is the BLAS MLX's own matmuls use too.
sgemm_fn sgemm() {
  static sgemm_fn fn = reinterpret_cast<sgemm_fn>(dlsym(RTLD_DEFAULT, "cblas_sgemm"));
  return fn;
}

// Our threads split the work, so each BLAS call inside one runs single-threaded: many small GEMMs
// each fanning out to BLAS threads spend their time waking and joining them (MKL only; other BLAS builds
// keep their own setting). Returns the previous thread-local setting (0: none), for restoring.
int blas_threads_here(int n) {
  static auto fn = reinterpret_cast<set_threads_local_fn>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  return fn ? fn(n) : 0;
}

void parallel_for(int64_t tasks, const std::function<void(int64_t)>& body, bool blas_inside = false) {
  int workers = static_cast<int>(std::min<int64_t>(tasks, num_threads()));
  if (workers <= 1) {  // inline, on MLX's CPU stream thread: restore its BLAS setting afterwards
    const int previous = blas_inside ? blas_threads_here(1) : 0;
    for (int64_t t = 0; t < tasks; ++t) body(t);
    if (blas_inside) blas_threads_here(previous);
    return;
  }
  std::atomic<int64_t> next{0};
  auto run = [&] {
    if (blas_inside) blas_threads_here(1);
    for (int64_t t = next++; t < tasks; t = next++) body(t);
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (int w = 1; w < workers; ++w) pool.emplace_back(run);
  run();
  for (auto& th : pool) th.join();
}

// Split [0, n) into about `per_thread` chunks per worker.
int64_t chunk_for(int64_t n, int64_t min_chunk) {
  int64_t c = (n + 4 * num_threads() - 1) / (4 * num_threads());
  return std::max<int64_t>(c, min_chunk);
}

// exp(x) for x <= ~88 (Cephes expf: range reduction by ln 2 in two parts, degree-5 polynomial, 2^n by
// exponent bits). Branch-free so that GCC vectorises the loops that call it; max error ~1 ulp.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.33654f), 88.3762626647949f);
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * (r * r) + r + 1.0f;
  // 2^n: n in [-126, 128]; n == 128 only for x at the top clamp, where y * 2^127 * 2 is taken instead.
  int32_t e = static_cast<int32_t>(n);
  int32_t e1 = e > 127 ? 127 : e;
  int32_t bits = (e1 + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale * (e > 127 ? 2.0f : 1.0f);
}

// Eigen's generic_fast_tanh_float rational approximation: mul/add/div only, ~1 ulp (the same
// coefficients as mlx_video/ops.py's MLX fallback).
inline float tanh_approx(float x) {
  constexpr float clamp = 7.90531110763549805f;
  x = std::min(std::max(x, -clamp), clamp);
  float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return p / q;
}

void require_cpu_fp32(const char* op, std::initializer_list<const mx::array*> arrays) {
  for (auto* a : arrays) {
    if (a->dtype() != mx::float32) throw std::invalid_argument(std::string(op) + ": float32 inputs only");
  }
}

mx::array fp32_contiguous(const mx::array& a, mx::StreamOrDevice s) {
  return mx::contiguous(mx::astype(a, mx::float32, s), false, s);
}

}  // namespace

bool blas_available() { return sgemm() != nullptr; }

int num_threads() {
  static int n = [] {
    if (const char* env = std::getenv("MLX_VIDEO_NATIVE_THREADS")) {
      int v = std::atoi(env);
      if (v > 0) return v;
    }
    unsigned hw = std::thread::hardware_concurrency();
    return hw ? static_cast<int>(hw) : 1;
  }();
  return n;
}

// ------------------------------------------------------------------------------------------------
// Flash attention
// ------------------------------------------------------------------------------------------------

namespace {

constexpr int kQueryBlock = 128;
constexpr int kKeyBlock = 512;

struct View4 {  // a [B, H, L, D] fp32 view whose last axis is contiguous
  const float* data;
  int64_t sb, sh, sl;
  const float* row(int64_t b, int64_t h, int64_t l) const { return data + b * sb + h * sh + l * sl; }
};

bool blas_friendly(const mx::array& a) {
  const auto& st = a.strides();
  const int64_t d = a.shape(3);
  return (st[3] == 1 || d == 1) && (st[2] >= d || a.shape(2) == 1) && st[2] > 0;
}

// Rows of `a` as BLAS operands: the array itself where each row is contiguous (the [B, L, H, D] ->
// [B, H, L, D] transposes the DiT passes in are), else a contiguous copy (broadcast or permuted axes).
View4 view4(const mx::array& a, std::vector<float>& copy) {
  const auto& st = a.strides();
  if (blas_friendly(a)) {
    return {a.data<float>(), static_cast<int64_t>(st[0]), static_cast<int64_t>(st[1]), static_cast<int64_t>(st[2])};
  }
  const int64_t B = a.shape(0), H = a.shape(1), L = a.shape(2), D = a.shape(3);
  copy.resize(B * H * L * D);
  const float* src = a.data<float>();
  float* dst = copy.data();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t l = 0; l < L; ++l)
        for (int64_t d = 0; d < D; ++d)
          *dst++ = src[b * st[0] + h * st[1] + l * st[2] + d * st[3]];
  return {copy.data(), H * L * D, L * D, D};
}

}  // namespace

mx::array flash_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                          mx::StreamOrDevice s) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4)
    throw std::invalid_argument("flash_attention: q, k, v must be [B, H, L, D]");
  if (k.shape() != v.shape() || q.shape(0) != k.shape(0) || q.shape(1) != k.shape(1) || q.shape(3) != k.shape(3))
    throw std::invalid_argument("flash_attention: q [B, H, Lq, D] and k, v [B, H, Lk, D] must agree");
  if (k.shape(2) == 0) throw std::invalid_argument("flash_attention: no keys");
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs{mx::astype(q, mx::float32, s), mx::astype(k, mx::float32, s),
                                mx::astype(v, mx::float32, s)};
  return mx::array(q.shape(), mx::float32, std::make_shared<FlashAttention>(stream, scale), std::move(inputs));
}

void FlashAttention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  out.set_data(mx::allocator::malloc(out.nbytes()));
  for (auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  encoder.dispatch([q = mx::array::unsafe_weak_copy(inputs[0]), k = mx::array::unsafe_weak_copy(inputs[1]),
                    v = mx::array::unsafe_weak_copy(inputs[2]), out = mx::array::unsafe_weak_copy(out),
                    scale = scale_]() mutable {
    const int64_t B = q.shape(0), H = q.shape(1), Lq = q.shape(2), D = q.shape(3), Lk = k.shape(2);
    std::vector<float> copies[3];
    const View4 Q = view4(q, copies[0]), K = view4(k, copies[1]), V = view4(v, copies[2]);
    float* O = out.data<float>();
    const int64_t qblocks = (Lq + kQueryBlock - 1) / kQueryBlock;
    auto gemm = sgemm();
    parallel_for(B * H * qblocks, [&](int64_t task) {
      const int64_t bh = task / qblocks, qb = task % qblocks, b = bh / H, h = bh % H;
      const int64_t i0 = qb * kQueryBlock, rows = std::min<int64_t>(kQueryBlock, Lq - i0);
      thread_local std::vector<float> scores, acc, row_max, row_sum;
      scores.resize(kQueryBlock * kKeyBlock);
      acc.assign(rows * D, 0.0f);
      row_max.assign(rows, -INFINITY);
      row_sum.assign(rows, 0.0f);
      const float* qrow = Q.row(b, h, i0);
      for (int64_t j0 = 0; j0 < Lk; j0 += kKeyBlock) {
        const int64_t cols = std::min<int64_t>(kKeyBlock, Lk - j0);
        // scores = scale * Q_blk K_blk^T   [rows, cols]
        gemm(kRowMajor, kNoTrans, kTrans, rows, cols, D, scale, qrow, Q.sl, K.row(b, h, j0), K.sl, 0.0f,
             scores.data(), cols);
        for (int64_t r = 0; r < rows; ++r) {
          float* srow = scores.data() + r * cols;
          float m = row_max[r];
#pragma omp simd reduction(max : m)
          for (int64_t c = 0; c < cols; ++c) m = srow[c] > m ? srow[c] : m;
          double sum = 0.0;  // up to kKeyBlock terms: summed in double, the row total stays exact to fp32
#pragma omp simd reduction(+ : sum)
          for (int64_t c = 0; c < cols; ++c) {
            const float e = exp_approx(srow[c] - m);
            srow[c] = e;
            sum += e;
          }
          const float correction = exp_approx(row_max[r] - m);  // exp(-inf) = 0 on the first block
          if (correction != 1.0f) {
            float* arow = acc.data() + r * D;
            for (int64_t d = 0; d < D; ++d) arow[d] *= correction;
          }
          row_sum[r] = row_sum[r] * correction + static_cast<float>(sum);
          row_max[r] = m;
        }
        // acc += P V_blk   [rows, D]
        gemm(kRowMajor, kNoTrans, kNoTrans, rows, D, cols, 1.0f, scores.data(), cols, V.row(b, h, j0), V.sl, 1.0f,
             acc.data(), D);
      }
      float* orow = O + ((b * H + h) * Lq + i0) * D;
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = 1.0f / row_sum[r];
        for (int64_t d = 0; d < D; ++d) orow[r * D + d] = acc[r * D + d] * inv;
      }
    }, /*blas_inside=*/true);
  });
}

void FlashAttention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("mlx-video native flash_attention is CPU-only (GPUs use fused SDPA)");
}

// ------------------------------------------------------------------------------------------------
// Modulated LayerNorm
// ------------------------------------------------------------------------------------------------

mx::array modulated_layer_norm(const mx::array& x, const mx::array& mul, const mx::array& add, float eps,
                               mx::StreamOrDevice s) {
  if (x.ndim() != 3) throw std::invalid_argument("modulated_layer_norm: x must be [B, L, D]");
  const int B = x.shape(0), D = x.shape(2);
  auto per_batch = [&](const mx::array& a, const char* what) {
    if (a.ndim() == 1 && a.shape(0) == D) return mx::broadcast_to(a, {1, 1, D}, s);
    if (a.ndim() == 3 && a.shape(1) == 1 && a.shape(2) == D && (a.shape(0) == B || a.shape(0) == 1)) return a;
    throw std::invalid_argument(std::string("modulated_layer_norm: ") + what + " must be [D], [1, 1, D] or [B, 1, D]");
  };
  auto m = per_batch(mul, "mul"), a = per_batch(add, "add");
  auto stream = mx::to_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<ModulatedLayerNorm>(stream, eps),
                   {fp32_contiguous(x, s), fp32_contiguous(m, s), fp32_contiguous(a, s)});
}

void ModulatedLayerNorm::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  out.set_data(mx::allocator::malloc(out.nbytes()));
  for (auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]), mul = mx::array::unsafe_weak_copy(inputs[1]),
                    add = mx::array::unsafe_weak_copy(inputs[2]), out = mx::array::unsafe_weak_copy(out),
                    eps = eps_]() mutable {
    const int64_t B = x.shape(0), L = x.shape(1), D = x.shape(2);
    const bool shared = mul.shape(0) == 1, shared_add = add.shape(0) == 1;
    const float *src = x.data<float>(), *mp = mul.data<float>(), *ap = add.data<float>();
    float* dst = out.data<float>();
    const int64_t rows = B * L, chunk = chunk_for(rows, 16);
    parallel_for((rows + chunk - 1) / chunk, [&](int64_t t) {
      for (int64_t row = t * chunk; row < std::min(rows, (t + 1) * chunk); ++row) {
        const int64_t b = row / L;
        const float* xr = src + row * D;
        const float* mr = mp + (shared ? 0 : b * D);
        const float* ar = ap + (shared_add ? 0 : b * D);
        float* yr = dst + row * D;
        double sum = 0.0;
        for (int64_t d = 0; d < D; ++d) sum += xr[d];
        const float mean = static_cast<float>(sum / D);
        double sq = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          const float c = xr[d] - mean;
          sq += static_cast<double>(c) * c;
        }
        const float rstd = static_cast<float>(1.0 / std::sqrt(sq / D + eps));
        for (int64_t d = 0; d < D; ++d) yr[d] = (xr[d] - mean) * rstd * mr[d] + ar[d];
      }
    });
  });
}

void ModulatedLayerNorm::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("mlx-video native modulated_layer_norm is CPU-only");
}

// ------------------------------------------------------------------------------------------------
// GELU (tanh)
// ------------------------------------------------------------------------------------------------

mx::array gelu_tanh(const mx::array& x, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<GeluTanh>(stream), {fp32_contiguous(x, s)});
}

namespace {

void gelu_rows(const float* src, float* dst, int64_t n) {
  const int64_t chunk = chunk_for(n, 1 << 14);
  parallel_for((n + chunk - 1) / chunk, [&](int64_t t) {
    const int64_t a = t * chunk, b = std::min(n, a + chunk);
    for (int64_t i = a; i < b; ++i) {
      const float v = src[i];
      const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
      dst[i] = 0.5f * v * (1.0f + tanh_approx(inner));
    }
  });
}

}  // namespace

void gelu_tanh_inplace(mx::array& x) {
  if (x.dtype() != mx::float32 || !x.is_available() || !x.flags().row_contiguous)
    throw std::invalid_argument("gelu_tanh_inplace: an evaluated, row-contiguous float32 array only");
  float* data = x.data<float>();
  gelu_rows(data, data, static_cast<int64_t>(x.size()));
}

void GeluTanh::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto& x = inputs[0];
  if (x.is_donatable() && x.flags().row_contiguous) {
    out.copy_shared_buffer(x);  // in place: the activation is freshly computed and used once
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  encoder.set_input_array(x);
  encoder.set_output_array(out);
  encoder.dispatch([x = mx::array::unsafe_weak_copy(x), out = mx::array::unsafe_weak_copy(out)]() mutable {
    gelu_rows(x.data<float>(), out.data<float>(), static_cast<int64_t>(x.size()));
  });
}

void GeluTanh::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("mlx-video native gelu_tanh is CPU-only");
}

// ------------------------------------------------------------------------------------------------
// 3x3 convolution (+ bias, ReLU)
// ------------------------------------------------------------------------------------------------

namespace {

// An NHWC fp32 image batch whose pixels are contiguous rows of C and whose rows hold W such pixels
// back to back; images and rows may be strided (a spatial crop of a larger frame, as tiled decoding
// passes in), anything else is copied once.
struct Images {
  const float* data;
  int64_t image_stride, row_stride;
  std::vector<float> copy;
  explicit Images(const mx::array& x) {
    const auto& st = x.strides();
    const int64_t N = x.shape(0), H = x.shape(1), W = x.shape(2), C = x.shape(3);
    if ((st[3] == 1 || C == 1) && (st[2] == C || W == 1)) {
      data = x.data<float>(), image_stride = st[0], row_stride = st[1];
      return;
    }
    copy.resize(N * H * W * C);
    const float* src = x.data<float>();
    float* dst = copy.data();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w)
          for (int64_t c = 0; c < C; ++c) *dst++ = src[n * st[0] + h * st[1] + w * st[2] + c * st[3]];
    data = copy.data(), image_stride = H * W * C, row_stride = W * C;
  }
};

// Rows r0-1 .. r0+R of image n, zero-padded by one column each side, into `padded` [(R + 3), W + 2, C]
// (the spare row absorbs the last taps' reads past the block's junk columns).
void pad_rows(const Images& x, int64_t n, int64_t H, int64_t W, int64_t C, int64_t r0, int64_t R,
              std::vector<float>& padded) {
  const int64_t W2 = W + 2;
  padded.assign((R + 3) * W2 * C, 0.0f);
  for (int64_t pr = 0; pr < R + 2; ++pr) {
    const int64_t r = r0 - 1 + pr;
    if (r < 0 || r >= H) continue;
    std::memcpy(padded.data() + (pr * W2 + 1) * C, x.data + n * x.image_stride + r * x.row_stride,
                W * C * sizeof(float));
  }
}

// Output rows per task: the padded input block and the accumulator together near 1.5 MiB (L2).
int64_t rows_per_block(int64_t H, int64_t W, int64_t C, int64_t O) {
  return std::clamp<int64_t>((3 * 512 * 1024) / ((W + 2) * (C + O) * 4) - 2, 1, H);
}

}  // namespace

mx::array conv3x3(const std::vector<mx::array>& xs, const mx::array& w, const std::optional<mx::array>& bias,
                  bool relu, mx::StreamOrDevice s) {
  if (xs.empty()) throw std::invalid_argument("conv3x3: no inputs");
  const auto& x0 = xs[0];
  if (w.ndim() != 4 || w.shape(1) != 3 || w.shape(2) != 3) throw std::invalid_argument("conv3x3: w must be [O, 3, 3, C]");
  const int O = w.shape(0);
  int channels = 0;
  std::vector<mx::array> inputs;
  for (const auto& x : xs) {
    if (x.ndim() != 4 || x.shape(0) != x0.shape(0) || x.shape(1) != x0.shape(1) || x.shape(2) != x0.shape(2))
      throw std::invalid_argument("conv3x3: inputs must be [N, H, W, C_i] with one N, H, W");
    channels += x.shape(3);
    inputs.push_back(mx::astype(x, mx::float32, s));  // strided crops are read in place
  }
  if (channels > w.shape(3)) throw std::invalid_argument("conv3x3: the inputs have more channels than w");
  inputs.push_back(fp32_contiguous(w, s));
  if (bias) {
    if (bias->size() != static_cast<size_t>(O)) throw std::invalid_argument("conv3x3: bias must be [O]");
    inputs.push_back(fp32_contiguous(mx::reshape(*bias, {O}, s), s));
  }
  auto stream = mx::to_stream(s);
  return mx::array({x0.shape(0), x0.shape(1), x0.shape(2), O}, mx::float32,
                   std::make_shared<Conv3x3>(stream, static_cast<int>(xs.size()), bias.has_value(), relu),
                   std::move(inputs));
}

void Conv3x3::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  out.set_data(mx::allocator::malloc(out.nbytes()));
  std::vector<mx::array> ins;
  for (const auto& a : inputs) {
    encoder.set_input_array(a);
    ins.push_back(mx::array::unsafe_weak_copy(a));
  }
  encoder.set_output_array(out);
  encoder.dispatch([ins = std::move(ins), out = mx::array::unsafe_weak_copy(out), terms = terms_,
                    has_bias = has_bias_, relu = relu_]() mutable {
    const int64_t N = out.shape(0), H = out.shape(1), W = out.shape(2), O = out.shape(3), W2 = W + 2;
    const auto& w = ins[terms];
    const int64_t Ctot = w.shape(3);
    std::vector<Images> images;
    for (int t = 0; t < terms; ++t) images.emplace_back(ins[t]);
    int64_t max_c = 0;
    for (int t = 0; t < terms; ++t) max_c = std::max<int64_t>(max_c, ins[t].shape(3));
    const int64_t rows = rows_per_block(H, W, max_c, O), blocks = (H + rows - 1) / rows;
    const float* bias = has_bias ? ins[terms + 1].data<float>() : nullptr;
    const float* wt = w.data<float>();
    float* dst = out.data<float>();
    auto gemm = sgemm();
    parallel_for(N * blocks, [&](int64_t task) {
      const int64_t n = task / blocks, r0 = (task % blocks) * rows, R = std::min(rows, H - r0);
      const int64_t M = R * W2;  // accumulator rows: R output rows of W + 2 (2 junk columns each)
      thread_local std::vector<float> padded, acc;
      acc.resize(M * O);
      bool first = true;
      int64_t channel0 = 0;  // this term's first channel in w (conv of the channel concatenation)
      for (int t = 0; t < terms; ++t) {
        const auto& x = ins[t];
        const int64_t C = x.shape(3);
        pad_rows(images[t], n, H, W, C, r0, R, padded);
        for (int64_t i = 0; i < 3; ++i) {
          for (int64_t j = 0; j < 3; ++j) {
            // rows q of tap (i, j) start at padded pixel q + i * W2 + j: consecutive pixels, lda = C;
            // w [O, 3, 3, Ctot] is that tap's [C, O] matrix transposed, rows 9 * Ctot apart
            gemm(kRowMajor, kNoTrans, kTrans, M, O, C, 1.0f, padded.data() + (i * W2 + j) * C, C,
                 wt + (i * 3 + j) * Ctot + channel0, 9 * Ctot, first ? 0.0f : 1.0f, acc.data(), O);
            first = false;
          }
        }
        channel0 += C;
      }
      for (int64_t rr = 0; rr < R; ++rr) {
        float* orow = dst + ((n * H + r0 + rr) * W) * O;
        const float* arow = acc.data() + rr * W2 * O;
        for (int64_t p = 0; p < W * O; p += O) {
          for (int64_t o = 0; o < O; ++o) {
            float y = arow[p + o] + (bias ? bias[o] : 0.0f);
            orow[p + o] = relu ? (y > 0.0f ? y : 0.0f) : y;
          }
        }
      }
    }, /*blas_inside=*/true);
  });
}

void Conv3x3::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("mlx-video native conv3x3 is CPU-only");
}

mx::array upconv3x3(const mx::array& x, const mx::array& w, const std::optional<mx::array>& bias,
                    mx::StreamOrDevice s) {
  if (x.ndim() != 4) throw std::invalid_argument("upconv3x3: x must be [N, H, W, C]");
  if (w.ndim() != 4 || w.shape(1) != 3 || w.shape(2) != 3 || w.shape(3) != x.shape(3))
    throw std::invalid_argument("upconv3x3: w must be [O, 3, 3, C]");
  const int O = w.shape(0);
  std::vector<mx::array> inputs{mx::astype(x, mx::float32, s), fp32_contiguous(w, s)};
  if (bias) {
    if (bias->size() != static_cast<size_t>(O)) throw std::invalid_argument("upconv3x3: bias must be [O]");
    inputs.push_back(fp32_contiguous(mx::reshape(*bias, {O}, s), s));
  }
  auto stream = mx::to_stream(s);
  return mx::array({x.shape(0), 2 * x.shape(1), 2 * x.shape(2), O}, mx::float32,
                   std::make_shared<UpConv3x3>(stream, bias.has_value()), std::move(inputs));
}

namespace {

// After a x2 nearest upsample, output phase a of a 3-tap axis sees low-res taps (i-1, i) with weights
// (w0, w1 + w2) for a = 0 and (i, i+1) with (w0 + w1, w2) for a = 1 (mlx_video/models/taehv.py
// _fold_taps). Folds w [O, 3, 3, C] into [2 (a), 2 (b), 2 (di), 2 (dj), C, O].
std::vector<float> fold_phases(const float* w, int64_t O, int64_t C) {
  static constexpr int taps[2][2][3] = {{{1, 0, 0}, {0, 1, 1}}, {{1, 1, 0}, {0, 0, 1}}};  // [phase][low tap][3x3 tap]
  std::vector<float> folded(16 * C * O, 0.0f);
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b)
      for (int di = 0; di < 2; ++di)
        for (int dj = 0; dj < 2; ++dj) {
          float* f = folded.data() + (((a * 2 + b) * 2 + di) * 2 + dj) * C * O;
          for (int u = 0; u < 3; ++u) {
            if (!taps[a][di][u]) continue;
            for (int v = 0; v < 3; ++v) {
              if (!taps[b][dj][v]) continue;
              for (int64_t o = 0; o < O; ++o)
                for (int64_t c = 0; c < C; ++c) f[c * O + o] += w[((o * 3 + u) * 3 + v) * C + c];
            }
          }
        }
  return folded;
}

}  // namespace

void UpConv3x3::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  out.set_data(mx::allocator::malloc(out.nbytes()));
  for (const auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]), w = mx::array::unsafe_weak_copy(inputs[1]),
                    b = has_bias_ ? std::optional<mx::array>(mx::array::unsafe_weak_copy(inputs[2])) : std::nullopt,
                    out = mx::array::unsafe_weak_copy(out)]() mutable {
    const int64_t N = x.shape(0), H = x.shape(1), W = x.shape(2), C = x.shape(3), O = out.shape(3), W2 = W + 2;
    const int64_t rows = rows_per_block(H, W, C, O), blocks = (H + rows - 1) / rows;
    const std::vector<float> folded = fold_phases(w.data<float>(), O, C);
    const Images images(x);
    const float* bias = b ? b->data<float>() : nullptr;
    const float* wt = folded.data();
    float* dst = out.data<float>();
    auto gemm = sgemm();
    parallel_for(N * blocks, [&](int64_t task) {
      const int64_t n = task / blocks, r0 = (task % blocks) * rows, R = std::min(rows, H - r0), M = R * W2;
      thread_local std::vector<float> padded, acc;
      pad_rows(images, n, H, W, C, r0, R, padded);
      acc.resize(M * O);
      for (int64_t a = 0; a < 2; ++a) {
        for (int64_t bb = 0; bb < 2; ++bb) {
          for (int64_t di = 0; di < 2; ++di) {
            for (int64_t dj = 0; dj < 2; ++dj) {
              // phase (a, b) reads low-res rows i - 1 + a + di, columns j - 1 + bb + dj
              gemm(kRowMajor, kNoTrans, kNoTrans, M, O, C, 1.0f, padded.data() + ((a + di) * W2 + bb + dj) * C, C,
                   wt + (((a * 2 + bb) * 2 + di) * 2 + dj) * C * O, O, di == 0 && dj == 0 ? 0.0f : 1.0f,
                   acc.data(), O);
            }
          }
          for (int64_t rr = 0; rr < R; ++rr) {
            float* orow = dst + ((n * 2 * H + 2 * (r0 + rr) + a) * 2 * W + bb) * O;
            const float* arow = acc.data() + rr * W2 * O;
            for (int64_t c = 0; c < W; ++c) {
              for (int64_t o = 0; o < O; ++o) orow[2 * c * O + o] = arow[c * O + o] + (bias ? bias[o] : 0.0f);
            }
          }
        }
      }
    }, /*blas_inside=*/true);
  });
}

void UpConv3x3::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("mlx-video native upconv3x3 is CPU-only");
}

// ------------------------------------------------------------------------------------------------
// RoPE
// ------------------------------------------------------------------------------------------------

mx::array rope(const mx::array& x, const mx::array& cos, const mx::array& sin, mx::StreamOrDevice s) {
  if (x.ndim() != 4 || x.shape(3) % 2) throw std::invalid_argument("rope: x must be [B, L, H, D] with even D");
  const int L = x.shape(1), half = x.shape(3) / 2;
  auto table = [&](const mx::array& t, const char* what) {
    if (static_cast<int64_t>(t.size()) != static_cast<int64_t>(L) * half)
      throw std::invalid_argument(std::string("rope: ") + what + " must hold [L, D/2] values");
    return fp32_contiguous(mx::reshape(t, {L, half}, s), s);
  };
  auto stream = mx::to_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<Rope>(stream),
                   {fp32_contiguous(x, s), table(cos, "cos"), table(sin, "sin")});
}

void Rope::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto& x = inputs[0];
  if (x.is_donatable() && x.flags().row_contiguous) {
    out.copy_shared_buffer(x);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  for (auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  encoder.dispatch([x = mx::array::unsafe_weak_copy(x), c = mx::array::unsafe_weak_copy(inputs[1]),
                    sn = mx::array::unsafe_weak_copy(inputs[2]), out = mx::array::unsafe_weak_copy(out)]() mutable {
    const int64_t B = x.shape(0), L = x.shape(1), H = x.shape(2), half = x.shape(3) / 2;
    const float *src = x.data<float>(), *cp = c.data<float>(), *sp = sn.data<float>();
    float* dst = out.data<float>();
    const int64_t rows = B * L, chunk = chunk_for(rows, 8);
    parallel_for((rows + chunk - 1) / chunk, [&](int64_t t) {
      for (int64_t row = t * chunk; row < std::min(rows, (t + 1) * chunk); ++row) {
        const int64_t l = row % L;
        const float *cr = cp + l * half, *sr = sp + l * half;
        for (int64_t h = 0; h < H; ++h) {
          const float* xr = src + (row * H + h) * 2 * half;
          float* yr = dst + (row * H + h) * 2 * half;
          for (int64_t i = 0; i < half; ++i) {
            const float x0 = xr[2 * i], x1 = xr[2 * i + 1];
            yr[2 * i] = x0 * cr[i] - x1 * sr[i];
            yr[2 * i + 1] = x0 * sr[i] + x1 * cr[i];
          }
        }
      }
    });
  });
}

void Rope::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("mlx-video native rope is CPU-only");
}

}  // namespace mlx_video
