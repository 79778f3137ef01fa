#!/usr/bin/env bash
# MLX's CUDA backend vs PyTorch on the same NVIDIA GPU: the `mlx-video bench` suite at real sizes, whole models
# (no layer subsets), bf16 on both sides, a few minutes on an H100/H200. Writes $OUT/bench.json (the same schema
# as the CPU report: benchmarks/report.py reads it), bench.md and bench.png.
#
#   OUT=gpu-results bash benchmarks/gpu_bench.sh                # from the repo root, on a machine with PyPI access
#   WHEELHOUSE=/path/to/wheels bash benchmarks/gpu_bench.sh     # offline: wheels fetched beforehand with
#                                                               #   pip download "mlx[cuda13]" torch diffusers ... -d /path/to/wheels
#   NO_VENV=1 bash benchmarks/gpu_bench.sh                      # use the current Python as it is (deps installed)
#
# Environment knobs: OUT (default gpu-results), VENV (.venv-gpu), MLX_CUDA_EXTRA (cuda13; cuda12 for CUDA 12
# drivers), DTYPE (bfloat16), SHAPES (small,device,paper), REPEATS (5), BENCH_ARGS (extra flags for the suite).
#
# Status: written and checked on the CPU only (the suite's --device gpu path needs an MLX build with a GPU
# backend, which this repo's CI machines do not have). The `device` tool's machines cannot reach PyPI and the
# mlx-cuda-13 wheel is larger than what a run may carry (64 MiB), so this script has not been run there; run it
# on any CUDA machine with PyPI access, or pass a WHEELHOUSE prepared elsewhere.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
VENV=${VENV:-.venv-gpu}
MLX_CUDA_EXTRA=${MLX_CUDA_EXTRA:-cuda13}
DTYPE=${DTYPE:-bfloat16}
SHAPES=${SHAPES:-small,device,paper}
REPEATS=${REPEATS:-5}
BENCH_ARGS=${BENCH_ARGS:-}

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_bench: no nvidia-smi: this script needs an NVIDIA GPU (on a Mac, run: mlx-video bench --device gpu)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [ -z "${NO_VENV:-}" ]; then
  python3 -m venv "$VENV"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  PIP=(python -m pip install -q)
  if [ -n "${WHEELHOUSE:-}" ]; then PIP+=(--no-index --find-links "$WHEELHOUSE"); fi
  "${PIP[@]}" --upgrade pip
  # The project's Linux dependency is mlx[cpu]; on a GPU machine install the CUDA backend instead (both at once
  # would ship two libmlx), then the project itself without its pinned dependencies.
  "${PIP[@]}" "mlx[$MLX_CUDA_EXTRA]" torch diffusers transformers safetensors sentencepiece ftfy regex imageio \
    imageio-ffmpeg huggingface_hub tqdm numpy matplotlib psutil protobuf
  "${PIP[@]}" --no-deps -e .
fi

python - <<'EOF'
import mlx_video  # noqa: F401
import mlx.core as mx, torch
from mlx_video.utils import gpu_available
print("mlx", mx.__version__, "gpu backend:", gpu_available(), "| torch", torch.__version__, "cuda:", torch.cuda.is_available())
assert gpu_available(), "this MLX has no GPU backend (install mlx[cuda13] or mlx[cuda12])"
assert torch.cuda.is_available(), "this torch has no CUDA"
EOF

mkdir -p "$OUT"
start=$(date +%s)
# Whole models at every shape: 30 DiT blocks, all 24 encoder blocks on both sides, every latent frame decoded.
# shellcheck disable=SC2086
python -m benchmarks.run --device gpu --dtype "$DTYPE" --shapes "$SHAPES" --models lightning,wan2.1-1.3b \
  --wan-shapes device --dit-layers 30 --encoder-ref-layers 24 --decode-latents "" --denoise-shapes "$SHAPES" \
  --repeats "$REPEATS" --denoise-repeats 2 --matmul-n 8192 --label "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
  --out "$OUT" $BENCH_ARGS | tail -n 40
echo "gpu_bench: done in $(( $(date +%s) - start )) s; results in $OUT/bench.json (+ bench.md, bench.png)"
