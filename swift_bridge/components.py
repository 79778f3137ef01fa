"""What the exporter knows about each model component: the Python config and model it mirrors, the Swift
template and class names, which weights stay fp32, and how to shrink a config for the golden tests.

Every size and key comes from the Python side: the config dataclass the runtime uses and the module tree
it builds (``tree_flatten(model.parameters())``). The tables below only map Python classes to Swift ones.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field

import mlx_video  # noqa: F401  (fast BLAS before MLX)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .codegen import GenerationError

# mlx-swift quantization the generated loader and golden tests cover: affine with whole values per uint32
# word. 3/5/6-bit words straddle element boundaries and the mx/nv floating-point modes need per-mode
# kernels and scale formats; none of them is verified on the phone, so they are refused.
SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SUPPORTED_MODES = ("affine",)


class UnsupportedQuantization(ValueError):
    """The text encoder is quantized in a way the Swift export does not support."""


@dataclass
class Component:
    name: str  # config.json section
    title: str
    module_name: str  # the Python module mirrored
    swift_file: str
    template: str
    config_attr: str  # config dataclass name in the module
    swift_config: str
    swift_root: str
    classes: dict[str, str]  # Python class name (in the module) -> Swift class
    library: dict[str, str]  # "module:Class" or "Class" -> MLXNN layer
    unary: tuple[str, ...] = ()  # Swift classes that conform to UnaryLayer (for mixed arrays)
    keep_fp32_attr: str | None = None  # module constant listing name fragments kept fp32
    dict_fields: dict[str, str] = field(default_factory=dict)  # config dict field -> Swift type
    module: object = None

    def load(self) -> "Component":
        if self.module is None:
            self.module = importlib.import_module(self.module_name)
        return self

    @property
    def config_class(self):
        return getattr(self.load().module, self.config_attr)

    @property
    def weights_file(self) -> str:
        return getattr(self.load().module, "WEIGHTS_NAME")

    @property
    def keep_fp32(self) -> tuple[str, ...]:
        return tuple(getattr(self.load().module, self.keep_fp32_attr)) if self.keep_fp32_attr else ()

    def python_classes(self) -> tuple[dict[type, str], dict[type, str]]:
        m = self.load().module
        classes = {getattr(m, k): v for k, v in self.classes.items()}
        library = {}
        for k, v in self.library.items():
            if ":" in k:
                mod, cls = k.split(":")
                library[getattr(importlib.import_module(mod), cls)] = v
            else:
                library[getattr(m, k)] = v
        return classes, library


DIT = Component(
    name="dit", title="Wan2.1 DiT", module_name="mlx_video.models.wan_dit", swift_file="WanDiT.swift",
    template="WanDiT.swift", config_attr="WanDiTConfig", swift_config="WanDiTConfiguration",
    swift_root="WanDiTModel",
    classes={"WanDiT": "WanDiTModel", "Block": "WanBlock", "Attention": "WanAttention", "QKNorm": "WanQKNorm",
             "FeedForward": "WanFeedForward", "MLP2": "WanMLP", "Head": "WanHead"},
    library={"mlx.nn:Linear": "Linear", "LayerNormAffine": "LayerNorm"},
    keep_fp32_attr="FP32_PARAMETERS",
)

TEXT_ENCODER = Component(
    name="text_encoder", title="UMT5 text encoder", module_name="mlx_video.models.umt5", swift_file="UMT5.swift",
    template="UMT5.swift", config_attr="UMT5Config", swift_config="UMT5Configuration",
    swift_root="UMT5EncoderModel",
    classes={"UMT5Encoder": "UMT5EncoderModel", "Block": "UMT5Block", "Attention": "UMT5Attention",
             "FeedForward": "UMT5FeedForward"},
    library={"mlx.nn:Linear": "Linear", "mlx.nn:Embedding": "Embedding", "RMSNorm": "RMSNorm"},
    keep_fp32_attr="FP32_PARAMETERS",
    dict_fields={"quantization": "QuantizationConfiguration"},
)

DECODER = Component(
    name="decoder", title="TAEHV decoder", module_name="mlx_video.models.taehv", swift_file="TAEHV.swift",
    template="TAEHV.swift", config_attr="TAEHVConfig", swift_config="TAEHVConfiguration",
    swift_root="TAEHVDecoder",
    classes={"TAEHV": "TAEHVDecoder", "MemBlock": "TAEHVMemBlock", "TGrow": "TAEHVTGrow", "Clamp": "TAEHVClamp",
             "Upsample": "TAEHVUpsample"},
    library={"Conv": "Conv2d", "ReLU": "ReLU"},
    unary=("Conv2d", "ReLU", "TAEHVClamp", "TAEHVUpsample"),
)

MODEL_COMPONENTS = (DIT, TEXT_ENCODER, DECODER)


def available(component: Component) -> str | None:
    """None when the Python module mirrored by ``component`` imports; else why not."""
    try:
        component.load()
    except ImportError as exc:
        return f"{component.module_name} is not available ({exc})"
    return None


# --------------------------------------------------------------------------------------------------
# Configs: from config.json sections, for export, and shrunk for golden tests
# --------------------------------------------------------------------------------------------------


def config_from_section(component: Component, section: dict):
    from mlx_video.utils import config_from_dict

    try:
        config = config_from_dict(component.config_class, section)
    except (TypeError, ValueError) as exc:
        raise GenerationError(f"config.json [{component.name}]: {exc}") from None
    if component is DECODER and config.has_encoder:
        # The app only decodes: the exported decoder drops the encoder (weights and Swift code).
        config = dataclasses.replace(config, has_encoder=False)
    if component is TEXT_ENCODER:
        check_quantization(config.quantization)
    return config


def check_quantization(q: dict | None) -> None:
    if not q:
        return
    if not isinstance(q, dict):
        raise UnsupportedQuantization(f"text_encoder.quantization must be an object, got {q!r}")
    mode = q.get("mode", "affine")
    bits, group = q.get("bits"), q.get("group_size")
    problems = []
    if mode not in SUPPORTED_MODES:
        problems.append(f"mode {mode!r} (supported: {', '.join(SUPPORTED_MODES)})")
    if bits not in SUPPORTED_BITS:
        problems.append(f"{bits}-bit weights (supported: {', '.join(map(str, SUPPORTED_BITS))})")
    if group not in SUPPORTED_GROUP_SIZES:
        problems.append(f"group size {group} (supported: {', '.join(map(str, SUPPORTED_GROUP_SIZES))})")
    if problems:
        raise UnsupportedQuantization(
            "unsupported text-encoder quantization for the Swift export: " + "; ".join(problems)
            + ". Re-convert the text encoder with `mlx-video convert --text-encoder ... -q --q-bits 4 "
            "--q-group-size 64` (affine INT4 is what the iPhone app is built and tested for).")


def golden_config(component: Component, config):
    """A tiny config with the same structure (per-layer widths differ across layers, same q/k norm,
    quantization bits and group size, same layer pattern) for the golden tests."""
    r = dataclasses.replace
    if component is DIT:
        return r(config, dim=64, num_layers=2, self_attn_heads=[3, 2], cross_attn_heads=[2, 3], ffn_dim=[96, 128],
                 head_dim=16, freq_dim=32, text_dim=128, text_len=8,
                 qk_norm_width=64 if config.qk_norm == "masked" else None)
    if component is TEXT_ENCODER:
        return r(config, vocab_size=160, dim=128, dim_attn=128, dim_ffn=256, num_heads=4, num_layers=2, text_len=8)
    if component is DECODER:
        return r(config, decoder_channels=[16, 8, 8, 8], has_encoder=False)
    raise KeyError(component.name)


def default_config(component: Component):
    config = component.config_class()
    return config_from_section(component, dataclasses.asdict(config))


# --------------------------------------------------------------------------------------------------
# Python model structure for a config (parameters stay unevaluated: MLX is lazy, so this is free)
# --------------------------------------------------------------------------------------------------


def build_model(component: Component, config, quantized: bool = True) -> nn.Module:
    m = component.load().module
    if component is DIT:
        return m.WanDiT(config)
    if component is TEXT_ENCODER:
        model = m.UMT5Encoder(config)
        q = config.quantization
        if quantized and q:
            nn.quantize(model, q["group_size"], q["bits"], mode=q.get("mode", "affine"),
                        class_predicate=lambda path, mod: hasattr(mod, "to_quantized") and m.is_quantized(path, q))
        return model
    if component is DECODER:
        return m.TAEHV(config)
    raise KeyError(component.name)


def expected_shapes(component: Component, config) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in tree_flatten(build_model(component, config).parameters())}


def summary(component: Component, config) -> list[str]:
    """Human-readable facts about the exported model, for the generated file headers and the README."""

    def runs(values) -> str:
        out, i = [], 0
        while i < len(values):
            j = i
            while j + 1 < len(values) and values[j + 1] == values[i]:
                j += 1
            out.append(f"{values[i]} x{j - i + 1}" if j > i else f"{values[i]}")
            i = j + 1
        return ", ".join(out)

    c = config
    if component is DIT:
        return [f"Exported DiT: {c.num_layers} layers, dim {c.dim}, head_dim {c.head_dim}, q/k norm {c.qk_norm!r}.",
                f"Self-attention heads per layer: {runs(c.self_attn_heads)}.",
                f"Cross-attention heads per layer: {runs(c.cross_attn_heads)}.",
                f"FFN width per layer: {runs(c.ffn_dim)}."]
    if component is TEXT_ENCODER:
        q = c.quantization
        qs = (f"{q['bits']}-bit affine, group {q['group_size']}" + (", embedding too" if q.get("embedding") else "")
              if q else "none")
        return [f"Exported UMT5: {c.num_layers} layers, dim {c.dim}, {c.num_heads} heads, FFN {c.dim_ffn}, "
                f"vocab {c.vocab_size}; quantization: {qs}."]
    if component is DECODER:
        return [f"Exported TAEHV decoder: channels {c.decoder_channels}, depth {c.depth}, time upscale "
                f"{c.decoder_time_upscale}, space upscale {c.decoder_space_upscale}."]
    return []


def random_weights(shapes: dict[str, tuple], seed: int) -> dict[str, mx.array]:
    """Deterministic fp32 weights of useful magnitude for golden models: matrices ~ N(0, 1/fan_in), norm
    weights ~ 1 + N(0, 0.1), everything else (biases, modulation, position tables) ~ N(0, 0.1)."""
    out = {}
    for i, key in enumerate(sorted(shapes)):
        shape = shapes[key]
        k = mx.random.key(seed * 100003 + i)
        n = mx.random.normal(shape, key=k)
        if len(shape) >= 2 and not key.endswith(("modulation", "pos_embedding.weight")):
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            out[key] = n * (fan_in ** -0.5)
        elif key.endswith("weight") and len(shape) == 1:
            out[key] = 1.0 + 0.1 * n
        else:
            out[key] = 0.1 * n
    mx.eval(out)
    return out
