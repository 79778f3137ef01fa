// mlx-video native CPU kernels (fp32): MLX primitives whose eval_cpu runs threaded C++.
//
// MLX's CPU backend has no fused attention and runs elementwise ops on one thread; these primitives
// replace the hot paths of the DiT on the CPU. Every op is an ordinary MLX array op: lazy, usable
// inside graphs, evaluated on the CPU stream. GPU evaluation is refused (MLX's own kernels are used
// there: mlx_video never routes GPU work here).
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlx_video {

namespace mx = mlx::core;

// softmax(q k^T * scale) v for q [B, H, Lq, D], k/v [B, H, Lk, D], fp32. No score matrix is kept:
// blocks of q k^T go through the loaded BLAS (cblas_sgemm) and an online softmax.
mx::array flash_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                          mx::StreamOrDevice s = {});

// LayerNorm(x) * mul + add with fp32 statistics; x [B, L, D]; mul/add [B, 1, D] (adaLN: 1 + scale,
// shift) or [D].
mx::array modulated_layer_norm(const mx::array& x, const mx::array& mul, const mx::array& add, float eps,
                               mx::StreamOrDevice s = {});

// GELU, tanh approximation (PyTorch approximate='tanh'), fp32.
mx::array gelu_tanh(const mx::array& x, mx::StreamOrDevice s = {});

// The same, overwriting an evaluated, row-contiguous fp32 array that the caller has just computed and
// owns (the FFN's hidden activations): no second hidden-sized buffer, as the NumPy path it replaces.
void gelu_tanh_inplace(mx::array& x);

// Wan's RoPE: x [B, L, H, D] viewed as D/2 complex pairs times (cos + i sin) [L, D/2].
mx::array rope(const mx::array& x, const mx::array& cos, const mx::array& sin, mx::StreamOrDevice s = {});

// conv3x3(concatenate(xs, channels), w) + bias, then ReLU if `relu`, without the concatenation:
// x_i [N, H, W, C_i], w [O, 3, 3, C] (PyTorch's layout, channels last) with sum C_i <= C (missing trailing
// channels are zeros: MemBlock's first frame), padding 1, stride 1. Threaded over blocks of output rows;
// each block pads its input rows once and runs 9 GEMMs per input straight off that buffer (no im2col,
// no weight copy), then adds bias and ReLU while the block is in cache.
mx::array conv3x3(const std::vector<mx::array>& xs, const mx::array& w, const std::optional<mx::array>& bias,
                  bool relu, mx::StreamOrDevice s = {});

// conv3x3(upsample_nearest(x, 2)) + bias without the upsampled copy: output phase (a, b) is a 2x2 conv of
// x with phase-folded weights (folded from w [O, 3, 3, C] once per call), written interleaved into
// [N, 2H, 2W, O].
mx::array upconv3x3(const mx::array& x, const mx::array& w, const std::optional<mx::array>& bias,
                    mx::StreamOrDevice s = {});

bool blas_available();
int num_threads();

class FlashAttention : public mx::UnaryPrimitive {
 public:
  FlashAttention(mx::Stream stream, float scale) : mx::UnaryPrimitive(stream), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "MlxVideoFlashAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const FlashAttention&>(other).scale_;
  }

 private:
  float scale_;
};

class ModulatedLayerNorm : public mx::UnaryPrimitive {
 public:
  ModulatedLayerNorm(mx::Stream stream, float eps) : mx::UnaryPrimitive(stream), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "MlxVideoModulatedLayerNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const ModulatedLayerNorm&>(other).eps_;
  }

 private:
  float eps_;
};

class GeluTanh : public mx::UnaryPrimitive {
 public:
  explicit GeluTanh(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "MlxVideoGeluTanh"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

class Conv3x3 : public mx::UnaryPrimitive {
 public:
  Conv3x3(mx::Stream stream, int terms, bool has_bias, bool relu)
      : mx::UnaryPrimitive(stream), terms_(terms), has_bias_(has_bias), relu_(relu) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "MlxVideoConv3x3"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const Conv3x3&>(other);
    return terms_ == o.terms_ && has_bias_ == o.has_bias_ && relu_ == o.relu_;
  }

 private:
  int terms_;
  bool has_bias_, relu_;
};

class UpConv3x3 : public mx::UnaryPrimitive {
 public:
  UpConv3x3(mx::Stream stream, bool has_bias) : mx::UnaryPrimitive(stream), has_bias_(has_bias) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "MlxVideoUpConv3x3"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return has_bias_ == static_cast<const UpConv3x3&>(other).has_bias_;
  }

 private:
  bool has_bias_;
};

class Rope : public mx::UnaryPrimitive {
 public:
  explicit Rope(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "MlxVideoRope"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

}  // namespace mlx_video
