"""Plain PyTorch TAEHV, written from ``shared/reference/models.md`` §4 (no PyPI package ships one).

PyTorch conventions throughout: NCHW convolutions, videos as NTCHW, parameters named exactly like the
``taew2_1.pth`` state dict (positional ``encoder.{i}`` / ``decoder.{i}`` keys). The decoder runs the
MemBlocks in parallel over time (each block's ``past`` is its input shifted by one frame, zeros in
front), then clamps to [0, 1] and drops the first ``t_upscale - 1`` frames.

Widths and depth are configurable so tests can build a small model; the defaults are ``taew2_1``.
Used by ``tests/test_taehv.py`` (parity) and ``benchmarks/taehv_decode.py`` (timings).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in * 2, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x, past):
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """``stride`` consecutive frames stacked along channels (frame-major), then a 1x1 conv."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x):
        nt, c, h, w = x.shape
        return self.conv(x.reshape(nt // self.stride, self.stride * c, h, w))


class TGrow(nn.Module):
    """A 1x1 conv to ``stride * n_f`` channels; channel block k becomes output frame k."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x):
        nt, c, h, w = x.shape
        return self.conv(x).reshape(nt * self.stride, c, h, w)


class TAEHVReference(nn.Module):
    def __init__(self, latent_channels: int = 16, decoder_channels=(256, 128, 64, 64), encoder_channels: int = 64,
                 depth: int = 3, decoder_time_upscale=(False, True, True), decoder_space_upscale=(True, True, True),
                 encoder_time_downscale=(True, True, False), patch_size: int = 1, image_channels: int = 3):
        super().__init__()
        self.latent_channels, self.patch_size = latent_channels, patch_size
        io = image_channels * patch_size**2
        e = encoder_channels
        enc = [conv(io, e), nn.ReLU()]
        for down in encoder_time_downscale:
            enc += [TPool(e, 2 if down else 1), conv(e, e, stride=2, bias=False)]
            enc += [MemBlock(e, e) for _ in range(depth)]
        enc.append(conv(e, latent_channels))
        self.encoder = nn.Sequential(*enc)
        n_f = list(decoder_channels)
        dec = [Clamp(), conv(latent_channels, n_f[0]), nn.ReLU()]
        for k in range(3):
            dec += [MemBlock(n_f[k], n_f[k]) for _ in range(depth)]
            dec += [nn.Upsample(scale_factor=2 if decoder_space_upscale[k] else 1),
                    TGrow(n_f[k], 2 if decoder_time_upscale[k] else 1), conv(n_f[k], n_f[k + 1], bias=False)]
        dec += [nn.ReLU(), conv(n_f[3], io)]
        self.decoder = nn.Sequential(*dec)
        self.t_downscale = 2 ** sum(t.stride == 2 for t in self.encoder if isinstance(t, TPool))
        self.t_upscale = 2 ** sum(t.stride == 2 for t in self.decoder if isinstance(t, TGrow))
        self.frames_to_trim = self.t_upscale - 1

    @staticmethod
    def _layer_step(layer, x, n, memory, i):
        """One layer on ``x`` [N*T, C, H, W]; MemBlock pasts are the input shifted by one frame."""
        if isinstance(layer, MemBlock):
            nt, c, h, w = x.shape
            xs = x.reshape(n, nt // n, c, h, w)
            first = torch.zeros_like(xs[:, :1]) if memory.get(i) is None else memory[i][:, None]
            past = torch.cat([first, xs[:, :-1]], 1).reshape(x.shape)
            memory[i] = xs[:, -1]
            return layer(x, past)
        return layer(x)

    def _run_sequence(self, seq: nn.Sequential, x: torch.Tensor, memory: dict | None = None) -> torch.Tensor:
        """Parallel over time: NTCHW in, NTCHW out. ``memory`` carries MemBlock inputs across calls."""
        n, t, c, h, w = x.shape
        memory = {} if memory is None else memory
        x = x.reshape(n * t, c, h, w)
        for i, layer in enumerate(seq):
            x = self._layer_step(layer, x, n, memory, i)
        return x.reshape(n, -1, *x.shape[1:])

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """NTCHW latents (Wan-normalized) -> NTCHW RGB in [0, 1], ``t_upscale*T - frames_to_trim`` frames.

        ``chunk``: latent frames per call with the MemBlock memory carried between calls (bounded memory,
        same result); ``None`` decodes all frames at once.
        """
        return torch.cat(list(self.decode_chunks(latents, chunk or latents.shape[1])), 1)

    @torch.no_grad()
    def decode_chunks(self, latents: torch.Tensor, chunk: int = 1):
        """Yield the decoded frames of ``chunk`` latents at a time (trimmed, clamped), memory carried."""
        memory: dict = {}
        raw = 0
        for s in range(0, latents.shape[1], chunk):
            x = self._run_sequence(self.decoder, latents[:, s:s + chunk], memory)
            if self.patch_size > 1:
                n, t, c, h, w = x.shape
                p = self.patch_size
                x = F.pixel_shuffle(x.flatten(0, 1), p).reshape(n, t, c // (p * p), h * p, w * p)
            skip = max(0, self.frames_to_trim - raw)
            raw += x.shape[1]
            yield x.clamp(0, 1)[:, skip:]

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """NTCHW RGB in [0, 1] -> NTCHW latents; frames padded at the end by repeating the last one."""
        if self.patch_size > 1:
            n, t, c, h, w = frames.shape
            p = self.patch_size
            frames = F.pixel_unshuffle(frames.flatten(0, 1), p).reshape(n, t, c * p * p, h // p, w // p)
        if frames.shape[1] % self.t_downscale:
            pad = self.t_downscale - frames.shape[1] % self.t_downscale
            frames = torch.cat([frames, frames[:, -1:].repeat_interleave(pad, 1)], 1)
        return self._run_sequence(self.encoder, frames)


@torch.no_grad()
def randomize_(model: TAEHVReference, seed: int = 0) -> TAEHVReference:
    """Deterministic random weights that keep activations O(1) through the whole depth.

    Normal weights with std sqrt(gain / fan_in): gain 2 after a ReLU, 1 for the linear 1x1 TPool/TGrow
    and the convs that follow them, 1/2 inside MemBlocks (the residual adds the input back); the last
    decoder conv is scaled down and biased to 0.5. Biases N(0, 0.1). The decoded frames then spread over
    (0, 1) instead of saturating at the clamp or collapsing onto the bias, so parity tests on them can
    fail.
    """
    g = torch.Generator().manual_seed(seed)
    last = f"decoder.{len(model.decoder) - 1}."
    after_linear = {f"{part}.{i + 1}.weight" for part in ("encoder", "decoder")
                    for i, layer in enumerate(getattr(model, part)) if isinstance(layer, (TPool, TGrow))}
    for name, p in model.named_parameters():
        if p.ndim == 4:
            fan_in = p.shape[1] * p.shape[2] * p.shape[3]
            if p.shape[-1] == 1 or name in after_linear:
                gain = 1.0
            elif ".conv." in name:
                gain = 0.5
            else:
                gain = 2.0
            if name.startswith(last):
                gain = 0.02
            p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(gain / fan_in))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (0.5 if name.startswith(last) else 0.0))
    return model
