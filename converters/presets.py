"""Per-checkpoint presets: the ``sampler`` section (and generation defaults) ``convert --preset`` records.

Causality, steps, shift and warping cannot be read from the weights (``shared/reference/checkpoints.md``
§5.3, §7), so each public Wan2.1-T2V-1.3B family ships as data here. Sources per entry are in checkpoints.md;
the causal presets are ``mlx_video.causal.PRESETS`` (reused, not repeated).
"""

from __future__ import annotations

import math

from mlx_video.causal import PRESETS as CAUSAL_PRESETS, preset_section as causal_preset_section
from mlx_video.sampling import DEFAULTS

from .common import ConversionError


def trigflow_sigmas(steps: int = 4, sigma_max: float = 80.0) -> list[float]:
    """rCM's TrigFlow schedule ([RCM] ``wan2pt1_t2v_rcm_infer.py``): theta = [atan(sigma_max), 1.5, 1.4, 1.0][:N],
    s = sin / (sin + cos) (fp64): 0.987654, 0.933781, 0.852895, 0.608979 for 4 steps."""
    if not 1 <= steps <= 4:
        raise ConversionError(f"rCM samples with 1 to 4 steps, not {steps}")
    thetas = [math.atan(sigma_max), 1.5, 1.4, 1.0][:steps]
    return [math.sin(t) / (math.sin(t) + math.cos(t)) for t in thetas]


_RCM_SIGMAS = trigflow_sigmas()

# name -> {"sampler": section fields, "defaults": generation defaults, "layout": required DiT source layout}
PRESETS: dict[str, dict] = {
    # Wan2.1 base: UniPC (bh2) 50 steps, CFG 5, shift 5 ([WAN] wan/configs/wan_t2v_1_3B.py, models.md §5.2).
    "wan2.1": dict(sampler=dict(name="unipc", steps=50, shift=5.0, guidance=5.0)),
    # CausVid bidirectional_checkpoint1/2: integer [1000, 757, 522], no warp, shift 8 (checkpoints.md §2).
    "causvid-bidirectional": dict(sampler=dict(name="fewstep", shift=8.0, denoising_step_list=[1000, 757, 522],
                                               warp=False)),
    # FastWan2.1: diffusers snapshot, DMD [1000, 757, 522] unwarped, shift 8, no CFG, 448x832x61 (§4.1).
    "fastwan": dict(sampler=dict(name="fewstep", shift=8.0, denoising_step_list=[1000, 757, 522], warp=False),
                    defaults=dict(height=448, width=832, frames=61), layout="diffusers"),
    # rCM: `net.` keys + Linear patch embedding; TrigFlow sigmas, bf16-rounded DiT timesteps (988, 932, 852,
    # 608), initial x = s0 * noise, fresh noise between steps, no shift/CFG; 77 frames at 480x832 (§4.2).
    "rcm": dict(sampler=dict(name="fewstep", sigmas=_RCM_SIGMAS, timestep_dtype="bfloat16",
                             noise_scale=_RCM_SIGMAS[0], warp=False),
                defaults=dict(height=480, width=832, frames=77), layout="rcm"),
    # LightX2V Wan2.1 distill: warped [1000, 750, 500, 250] at shift 5, deterministic Euler, no CFG (§4.3).
    "lightx2v-distill": dict(sampler=dict(name="fewstep", shift=5.0, denoising_step_list=[1000, 750, 500, 250],
                                          warp=True, stochastic=False)),
}

# The .pth entry each family's own inference reads when its file holds both (checkpoints.md §1-§3): the
# default elsewhere is `generator_ema`, the EMA weights Self-Forcing and its frame-wise successors run.
CHECKPOINT_ENTRY = {
    "causvid-ar": "generator",  # [CV] autoregressive_inference.py: torch.load(...)["generator"]
    "causal-forcing": "generator",  # [CF] README: chunk-wise runs without --use_ema
    "longlive": "generator",  # [LL] inference.py: use_ema false -> state["generator"]
}


def checkpoint_entries(preset: str | None, select: str | None) -> str | tuple[str, ...] | None:
    """What ``open_checkpoint(select=...)`` gets: the user's ``--select``, else the preset's usual entry as a
    preference (files holding one entry still load), else None (the default order)."""
    if select is not None:
        return select
    entry = CHECKPOINT_ENTRY.get(preset or "")
    return (entry,) if entry else None


# Families this runtime cannot run faithfully: refused with the reason, never loaded partially.
REFUSED = {
    "turbowan": "TurboWan2.1 replaces every self-attention with sparse-linear attention (SLA: top-k block-sparse "
                "softmax plus a trained linear branch, blocks.N.self_attn.attn_op.local_attn.proj_l); this runtime "
                "has no SLA branch, and dense attention would silently drop trained weights (checkpoints.md §4.4)",
}


def preset_names() -> list[str]:
    return [*PRESETS, *CAUSAL_PRESETS]


def check_preset(name: str) -> None:
    """A usage problem with ``--preset NAME``, raised before anything is read."""
    from mlx_video.utils import UsageError

    if name.lower() in REFUSED:
        raise UsageError(f"--preset {name}: not supported: {REFUSED[name.lower()]}")
    if name not in PRESETS and name not in CAUSAL_PRESETS:
        raise UsageError(f"--preset {name}: unknown; choose one of {', '.join(preset_names())}")


def preset_section(name: str) -> dict:
    """The ``sampler`` section of ``config.json`` for preset ``name`` (``preset`` names it; ``defaults`` holds
    the family's default video size when it has one)."""
    check_preset(name)
    if name in CAUSAL_PRESETS:
        return causal_preset_section(name)
    p = PRESETS[name]
    sampler = p["sampler"]
    section = {**DEFAULTS[sampler["name"]], **sampler, "preset": name}
    if "defaults" in p:
        section["defaults"] = dict(p["defaults"])
    return section


def required_layout(name: str | None) -> str | None:
    """The DiT source layout a preset was made for (None: any)."""
    return PRESETS.get(name, {}).get("layout") if name else None
