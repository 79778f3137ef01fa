"""The three recipe stages, each writing its component into one ordinary model folder.

1. ``autoencoder``: TAEHV (``models/taehv.py``) at small widths, 16 latent channels, 8x spatial and 4x
   temporal compression, trained on 32x32 crops of world clips and images around the shape (L1 with the
   shape and a ring around it weighted up), starting from a colour-carrying init; afterwards its latents
   are standardised per channel (folded into the weights). Writes ``decoder.safetensors`` (encoder
   included).
2. ``text``: a sentencepiece model trained on every world caption, and a small UMT5 encoder
   (``models/umt5.py``) pre-trained by masked-token prediction (tied embedding head) on captions. Frozen
   afterwards, as Wan's T5 is. Writes ``spiece.model`` and ``text_encoder.safetensors``.
3. ``teacher``: a small Wan DiT (``models/wan_dit.py``) trained with flow matching on the autoencoder's
   latents of a fixed pool of clips (and images), timesteps drawn uniformly over the shift-5 schedule as
   Wan trains, captions dropped 10% of the time (the empty prompt) so that classifier-free guidance works.
   Writes ``dit.safetensors`` and a UniPC + CFG ``sampler`` section.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import fsio
from ..models import taehv, umt5, wan_dit
from ..utils import CONFIG_NAME, MLX_VIDEO_FORMAT, config_to_dict, parameter_count, read_config
from . import nets, world
from .train import RecipeError, Stage, check_stage, run

TEXT_DIM = 64
VOCAB_SIZE = 128
CAPTION_DROPOUT = 0.1
TRAIN_SHIFT = 5.0  # Wan's flow-matching shift; the sampler section uses the same
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class Sizes:
    """Model widths and data settings (``default``: the real recipe; ``smoke``: seconds, for CI)."""

    ae_decoder: tuple = (32, 24, 16, 12)
    ae_encoder: int = 16
    ae_batch: int = 8
    ae_frames: int = 5
    ae_crop: int = 32  # training crops around the shape (0: full frames)
    text_layers: int = 2
    text_batch: int = 64
    dit_dim: int = 128
    dit_layers: int = 4
    dit_heads: int = 4
    dit_ffn: int = 384
    dit_batch: int = 16  # 2.7 steps/s vs 1.3 at 32 on this machine: more updates for the same samples
    # spatial patch of the DiT: 2 is Wan's; 1 gives 4x the tokens (and ~4.5x the time), but the world moves a
    # shape about half a 2 x 2 token per latent frame, which a 2 x 2 patch leaves to the MLP (see results/)
    dit_patch: int = 2
    pool_clips: int = 1024
    pool_images: int = 128
    image_fraction: float = 0.1


SIZES = {"default": Sizes(), "smoke": Sizes(ae_decoder=(8, 8, 8, 8), ae_encoder=8, ae_batch=1, ae_frames=1,
                                             text_batch=8, dit_dim=64, dit_layers=2, dit_heads=2, dit_ffn=128,
                                             dit_batch=8, pool_clips=8, pool_images=4)}


def ensure_model_folder(out: Path) -> None:
    """Create an empty model folder (only ``config.json``) so training state can live inside it."""
    if (out / CONFIG_NAME).exists():
        read_config(out)  # a clear error if it is not ours
        return
    with fsio.atomic_model_folder(out) as tmp:
        (tmp / CONFIG_NAME).write_text(f'{{"format": "{MLX_VIDEO_FORMAT}"}}\n')


def write_component(out: Path, files: dict[str, object], section: str, value: dict, extra: dict | None = None) -> None:
    """Atomically add a component: ``files`` (name -> weights dict or bytes) and its config section."""
    from ..utils import save_weights, write_config_section

    with fsio.atomic_model_folder(out, replace=tuple(files)) as tmp:
        for name, data in files.items():
            if isinstance(data, bytes):
                (tmp / name).write_bytes(data)
            else:
                save_weights(tmp / name, data)
        write_config_section(tmp, out, section, value)
        for key, val in (extra or {}).items():
            write_config_section(tmp, tmp, key, val)


def _seed_init(seed: int, offset: int) -> None:
    mx.random.seed(seed * 1000 + offset)


def _flat(model) -> dict:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.parameters()))


# --------------------------------------------------------------------------------------------------
# 1. Autoencoder
# --------------------------------------------------------------------------------------------------

LATENT_PENALTY = 1e-3  # weight of (mean(z^2) - 1)^2: latents near unit scale, like Wan's normalised ones
FOREGROUND_WEIGHT = 10.0
FOREGROUND_RADIUS = 3  # pixels around the shape that get its weight too


def autoencoder_config(sizes: Sizes) -> taehv.TAEHVConfig:
    return taehv.TAEHVConfig(latent_channels=16, decoder_channels=list(sizes.ae_decoder),
                             encoder_channels=sizes.ae_encoder, depth=1, has_encoder=True)


def he_init(model: taehv.TAEHV) -> None:
    """He-uniform convolutions, and the last conv of each MemBlock scaled down so blocks start near identity.

    TAEHV has no normalisation layers: with PyTorch's default init the signal shrinks ~2.4x per ReLU conv,
    the decoder's output starts independent of its input, and training sits on the mean-colour plateau.
    """
    from mlx.utils import tree_flatten

    updates = []
    for name, w in tree_flatten(model.parameters()):
        if name.endswith(".weight") and w.ndim == 4:
            bound = math.sqrt(6.0 / (w.shape[1] * w.shape[2] * w.shape[3]))
            if ".conv.4." in name:
                bound *= 0.1
            updates.append((name, mx.random.uniform(-bound, bound, w.shape)))
    model.load_weights(updates, strict=False)


COLOUR_CHANNELS = 3


TENT = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16  # 3x3 blur: area sampling and smooth upsampling


def _identity_rows(conv: taehv.Conv, rows: list[tuple[int, list[tuple[int, float]]]], blur: bool = False) -> None:
    """Set output channels ``rows`` of ``conv`` to read only their listed inputs, at the centre tap (or
    through the 3x3 tent ``TENT`` when ``blur``)."""
    w = np.array(conv.weight)
    kh, kw = w.shape[1] // 2, w.shape[2] // 2
    tent = blur and w.shape[1] == 3 and w.shape[2] == 3
    for out_channel, sources in rows:
        w[out_channel] = 0.0
        for in_channel, value in sources:
            if tent:
                w[out_channel, :, :, in_channel] = value * TENT
            else:
                w[out_channel, kh, kw, in_channel] = value
    conv.weight = mx.array(w)
    if "bias" in conv:
        b = np.array(conv.bias)
        b[[r for r, _ in rows]] = 0.0
        conv.bias = mx.array(b)


def colour_identity_init(model: taehv.TAEHV, channels: int = COLOUR_CHANNELS, blur: bool = False) -> None:
    """Carry the RGB colour through the first ``channels`` channels of every layer at initialisation.

    The encoder starts as an area subsampler (latent channels 0-2 = the colour around each 8x8 block,
    averaged over each group of 4 frames), the decoder as a smooth upsampler of them, so the untrained
    autoencoder already returns a blurred but coloured clip. The remaining channels keep their He init and
    learn the detail. Without this, training on random scenes learns luminance first and the latents never
    pick up the chroma: grey blobs after 1500 steps (measured, ``recipe/results/README.md``). ``blur``:
    the strided encoder convolutions and the convolutions after each upsampling start as the 3x3 tent
    (else a centre tap: point sampling and blocky nearest upsampling).
    """
    after_upsample = False
    for part in (model.encoder, model.decoder):
        for layer in part:
            if isinstance(layer, taehv.Conv):
                smooth = blur and (layer.stride == 2 or after_upsample)
                _identity_rows(layer, [(i, [(i, 1.0)]) for i in range(min(channels, layer.weight.shape[0]))], smooth)
            elif isinstance(layer, taehv.TPool):  # input channels are [stride, c]: average the frames
                c, s = layer.conv.weight.shape[0], layer.stride
                _identity_rows(layer.conv, [(i, [(j * c + i, 1.0 / s) for j in range(s)]) for i in range(channels)])
            elif isinstance(layer, taehv.TGrow):  # output channels are [stride, c]: copy to each frame
                c, s = layer.conv.weight.shape[-1], layer.stride
                _identity_rows(layer.conv, [(j * c + i, [(i, 1.0)]) for j in range(s) for i in range(channels)])
            elif isinstance(layer, taehv.MemBlock):  # the skip carries the colour; the residual adds nothing
                last = layer.conv[4]
                last.weight = mx.concatenate([mx.zeros_like(last.weight[:channels]), last.weight[channels:]])
                last.bias = mx.concatenate([mx.zeros_like(last.bias[:channels]), last.bias[channels:]])
            if isinstance(layer, taehv.Upsample):
                after_upsample = layer.factor > 1
            elif not isinstance(layer, taehv.TGrow):
                after_upsample = False


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def heldout_clips(n: int, frames: int = world.FRAMES) -> np.ndarray:
    """Clips no training run sees (seeds far outside the training streams)."""
    rng = np.random.default_rng([7, 7, 7])
    return np.stack([world.render_clip(world.sample_scene(rng), frames) for _ in range(n)])


def autoencoder_psnr(model: taehv.TAEHV, clips: np.ndarray, batch: int = 4) -> dict:
    """Round-trip PSNR (dB, frames in [0, 1]) and latent statistics over ``clips``."""
    values, zs = [], []
    for s in range(0, len(clips), batch):
        x = mx.array(clips[s:s + batch])
        z = taehv.encode(model, x)
        y = taehv.decode(model, z)
        mx.eval(y)
        zs.append(np.array(z))
        values += [psnr(np.array(y[i]), clips[s + i]) for i in range(x.shape[0])]
    z = np.concatenate(zs)
    return {"psnr_db": float(np.mean(values)), "psnr_db_min": float(np.min(values)), "clips": len(values),
            "latent_mean": float(z.mean()), "latent_std": float(z.std())}


def crop_around_shape(clips: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` x ``size`` crops of ``clips [B, F, H, W, 3]`` around each clip's shape (jittered by up to a
    quarter of the crop), at multiples of 8 so that the latent grid keeps its phase. The autoencoder is
    convolutional, so crops teach it the same thing at a quarter of the cost per sample (measured: 2.4x
    more steps per second at 8 crops than at 4 full clips, 2.8 vs 1.2)."""
    b, f, h, w, _ = clips.shape
    if size >= h:
        return clips
    out = []
    for clip in clips:
        mask = (np.abs(clip - clip[:, :1, :1]).sum(-1) > 0.05).any(axis=0)
        ys, xs = np.nonzero(mask)
        cy, cx = (ys.mean(), xs.mean()) if ys.size else (h / 2, w / 2)
        jitter = rng.integers(-(size // 4), size // 4 + 1, size=2)
        y0 = int(np.clip(cy - size / 2 + jitter[0], 0, h - size)) // 8 * 8
        x0 = int(np.clip(cx - size / 2 + jitter[1], 0, w - size)) // 8 * 8
        out.append(clip[:, y0:y0 + size, x0:x0 + size])
    return np.stack(out)


def foreground_weight(clips: np.ndarray, radius: int = FOREGROUND_RADIUS) -> np.ndarray:
    """``1 + FOREGROUND_WEIGHT`` on the shape and ``radius`` pixels around it, 1 elsewhere: ``[B, F, H, W, 1]``.

    The ring matters: weighting only the shape's own pixels made a blurred halo around it cheap (measured:
    held-out PSNR 21.7 dB without the ring, 24.3 dB with it, same steps)."""
    mask = np.abs(clips - clips[:, :, :1, :1]).sum(-1) > 0.05  # the corner pixel is always background
    for axis in (2, 3):  # separable square dilation
        grown = mask.copy()
        n = mask.shape[axis]
        for d in range(1, radius + 1):
            lo = [slice(None)] * mask.ndim
            hi = [slice(None)] * mask.ndim
            lo[axis], hi[axis] = slice(d, n), slice(0, n - d)
            grown[tuple(lo)] |= mask[tuple(hi)]
            grown[tuple(hi)] |= mask[tuple(lo)]
        mask = grown
    return (1.0 + FOREGROUND_WEIGHT * mask[..., None]).astype(np.float32)


def normalise_latents(model: taehv.TAEHV, seed: int, clips: int = 64) -> dict:
    """Fold per-channel latent standardisation into the encoder's last convolution (exact) and its inverse
    into the decoder's first convolution (exact up to the decoder's soft clamp ``3 tanh(z/3)``).

    The trained latents have per-channel std 0.13-0.35 and means up to 0.7; noise in flow matching has
    std 1, so with Wan's shift 5 the teacher would spend almost no training samples and sampler steps
    at the noise levels where such small latents take shape. Measured cost of the fold in round-trip PSNR:
    none for the recipe's 900-step autoencoder (25.80 -> 25.84 dB), 1 dB for an 886-step one (25.7 -> 24.7)."""
    rng = np.random.default_rng([seed, 4])
    zs = []
    for s in range(0, clips, 8):
        x = np.stack([world.render_clip(world.sample_scene(rng)) for _ in range(min(8, clips - s))])
        z = taehv.encode(model, mx.array(x))
        mx.eval(z)
        zs.append(np.array(z).reshape(-1, z.shape[-1]))
    z = np.concatenate(zs)
    mean, std = z.mean(0), np.maximum(z.std(0), 1e-3)
    last = model.encoder[-1]
    last.weight = last.weight / mx.array(std)[:, None, None, None]
    last.bias = (last.bias - mx.array(mean)) / mx.array(std)
    first = model.decoder[1]
    w = np.array(first.weight)
    first.bias = first.bias + mx.array((w * mean).sum(axis=(1, 2, 3)))
    first.weight = mx.array(w * std)
    return {"mean": [round(float(v), 5) for v in mean], "std": [round(float(v), 5) for v in std], "clips": clips}


def train_autoencoder(out: Path, steps: int, seed: int, resume: bool, sizes: Sizes, checkpoint_every: int = 100,
                      lr: float = 4e-4, progress: bool = True, stop_after: int | None = None) -> dict:
    cfg = autoencoder_config(sizes)
    stage = Stage("autoencoder", out, steps, seed, {"config": config_to_dict(cfg), "batch": sizes.ae_batch,
                                                    "frames": sizes.ae_frames, "crop": sizes.ae_crop, "lr": lr,
                                                    "loss": "l1, shape+ring weighted"}, checkpoint_every, resume,
                  lr=lr, warmup=50, progress=progress, stop_after=stop_after)
    check_stage(stage)  # bad flags and wrong resume folders fail before anything is written
    ensure_model_folder(out)
    _seed_init(seed, 1)
    model = taehv.TAEHV(cfg)
    he_init(model)
    colour_identity_init(model)
    frames = sizes.ae_frames

    def batch_fn(step):
        clips, _, _ = world.batch(seed, step, sizes.ae_batch, frames, image_fraction=sizes.image_fraction)
        if sizes.ae_crop:
            clips = crop_around_shape(clips, sizes.ae_crop, np.random.default_rng([seed, step, 1]))
        return mx.array(clips), mx.array(foreground_weight(clips))

    def loss_fn(model, x, w):
        z = nets.taehv_encode(model, x)
        y = nets.taehv_decode(model, z)
        # L1 (sharper edges than MSE: measured round-trip motion 88% vs 63%, same steps), the shape and a
        # ring around it weighted FOREGROUND_WEIGHT times more: without it the small shapes stay a blur.
        err = mx.sum(w * mx.abs(y - x)) / (3 * mx.sum(w))
        return err + LATENT_PENALTY * (mx.mean(z * z) - 1.0) ** 2

    summary = run(stage, model, loss_fn, batch_fn)
    if not summary["finished"]:
        return summary
    held = heldout_clips(16 if steps > 20 else 2)
    summary["heldout_before_normalisation"] = autoencoder_psnr(model, held)
    normalisation = normalise_latents(model, seed, 64 if steps > 20 else 8)
    evaluation = autoencoder_psnr(model, held)
    summary["heldout"] = evaluation
    weights = _flat(model)
    write_component(out, {taehv.WEIGHTS_NAME: weights}, "decoder", {
        **config_to_dict(cfg), "weights_file": taehv.WEIGHTS_NAME, "dtype": "float32",
        "parameters": parameter_count(model),
        "summary": f"recipe TAEHV trained on the shapes world ({steps} steps, held-out PSNR "
                   f"{evaluation['psnr_db']:.1f} dB)", "recipe": summary_short(summary),
        "latent_normalisation": normalisation})
    return summary


def summary_short(summary: dict) -> dict:
    return {k: summary.get(k) for k in ("steps", "seed", "wall_seconds", "loss_first", "loss_last", "heldout",
                                       "heldout_before_normalisation")
            if summary.get(k) is not None}


# --------------------------------------------------------------------------------------------------
# 2. Text encoder
# --------------------------------------------------------------------------------------------------

MASK_ID = 2  # <unk> doubles as the mask token of the masked-token pre-training
MASK_RATE = 0.25
# Weight of the caption-attribute loss beside masked-token prediction. Masked-token prediction alone left
# the direction and shape words in one position each (measured on teacher2's encoder: "left" -> "right"
# moved the output by 12% of its norm, all at that token; "red" -> "blue" by 53%, everywhere), and the
# teacher's videos then ignored the direction: the same motion for left, right, up and down.
ATTRIBUTE_WEIGHT = 1.0


class TextPretrainer(nn.Module):
    """The UMT5 encoder plus one linear head per caption attribute (``world.CAPTION_ATTRIBUTES``), applied
    at every token: each position must tell colour, shape, motion, background and size. Only the encoder
    is kept."""

    def __init__(self, cfg: umt5.UMT5Config):
        super().__init__()
        self.encoder = umt5.UMT5Encoder(cfg)
        self.heads = {name: nn.Linear(cfg.dim, len(values)) for name, values in world.CAPTION_ATTRIBUTES.items()}


def attribute_labels(captions: list[str]) -> dict[str, np.ndarray]:
    """Class index per caption for each attribute head."""
    said = [world.caption_attributes(c) for c in captions]
    return {name: np.array([values.index(a[name]) for a in said], np.int32)
            for name, values in world.CAPTION_ATTRIBUTES.items()}


def train_sentencepiece() -> bytes:
    """Deterministic: one thread over the fixed caption list."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(world.all_captions()), model_writer=buf,
                                   vocab_size=VOCAB_SIZE, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, character_coverage=1.0, minloglevel=2, num_threads=1)
    return buf.getvalue()


def text_config(vocab: int, text_len: int, sizes: Sizes) -> umt5.UMT5Config:
    return umt5.UMT5Config(vocab_size=vocab, dim=TEXT_DIM, dim_attn=TEXT_DIM, dim_ffn=2 * TEXT_DIM, num_heads=4,
                           num_layers=sizes.text_layers, text_len=text_len)


def train_text(out: Path, steps: int, seed: int, resume: bool, sizes: Sizes, checkpoint_every: int = 100,
               lr: float = 2e-3, progress: bool = True, stop_after: int | None = None) -> dict:
    from ..tokenizer import Tokenizer

    model_bytes = train_sentencepiece()
    tmp_file = out.parent / f".{out.name}.spiece-{seed}.model"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_file.write_bytes(model_bytes)
    try:
        tok = Tokenizer(tmp_file)
    finally:
        tmp_file.unlink()
    longest = max(len(tok.encode(c)) for c in world.all_captions())
    text_len = max(16, 8 * math.ceil((longest + 4) / 8))
    tok.max_length = text_len
    cfg = text_config(tok.vocab_size, text_len, sizes)
    stage = Stage("text", out, steps, seed, {"config": config_to_dict(cfg), "batch": sizes.text_batch, "lr": lr,
                                             "tokenizer_sha256": tok.fingerprint,
                                             "attribute_weight": ATTRIBUTE_WEIGHT}, checkpoint_every, resume, lr=lr,
                  warmup=20, weight_decay=0.01, progress=progress, stop_after=stop_after)
    check_stage(stage)  # bad flags and wrong resume folders fail before anything is written
    ensure_model_folder(out)
    _seed_init(seed, 2)
    model = TextPretrainer(cfg)
    encoder = model.encoder
    encoder.token_embedding.weight = mx.random.normal(encoder.token_embedding.weight.shape)  # T5 embeddings are O(1)

    def batch_fn(step):
        rng = np.random.default_rng([seed, step, 2])
        caps = [world.caption(world.sample_scene(rng), rng, image=bool(rng.uniform() < sizes.image_fraction))
                for _ in range(sizes.text_batch)]
        ids = np.zeros((len(caps), text_len), np.int32)
        valid = np.zeros((len(caps), text_len), bool)
        for i, c in enumerate(caps):
            t = tok.encode(c)
            ids[i, :len(t)], valid[i, :len(t)] = t, True
        masked = valid & (ids != tok.eos_id) & (rng.uniform(size=ids.shape) < MASK_RATE)
        inputs = np.where(masked, MASK_ID, ids)
        labels = attribute_labels(caps)
        return (mx.array(inputs), mx.array(valid), mx.array(ids), mx.array(masked.astype(np.float32)),
                *(mx.array(labels[name]) for name in world.CAPTION_ATTRIBUTES))

    def cross_entropy(logits, targets):
        return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]

    def loss_fn(model, inputs, valid, targets, masked, *labels):
        h = nets.umt5_forward(model.encoder, inputs, valid)
        ce = cross_entropy(h @ model.encoder.token_embedding.weight.T, targets)
        loss = mx.sum(ce * masked) / mx.maximum(mx.sum(masked), 1.0)
        weight = valid.astype(mx.float32)
        for name, label in zip(world.CAPTION_ATTRIBUTES, labels):  # at every real token of the caption
            per_token = cross_entropy(model.heads[name](h), mx.broadcast_to(label[:, None], valid.shape))
            loss = loss + ATTRIBUTE_WEIGHT * mx.sum(per_token * weight) / mx.sum(weight)
        return loss

    summary = run(stage, model, loss_fn, batch_fn)
    if not summary["finished"]:
        return summary
    write_component(out, {umt5.WEIGHTS_NAME: _flat(encoder), umt5.TOKENIZER_NAME: model_bytes}, "text_encoder", {
        **config_to_dict(cfg), "weights_file": umt5.WEIGHTS_NAME, "dtype": "float32",
        "parameters": parameter_count(encoder), "tokenizer_file": umt5.TOKENIZER_NAME,
        "tokenizer_sha256": tok.fingerprint, "tokenizer_vocab_size": tok.vocab_size,
        "summary": f"recipe UMT5 ({cfg.num_layers} layers, width {cfg.dim}) pre-trained by masked-token prediction "
                   f"and caption-attribute prediction at every token on world captions ({steps} steps)",
        "recipe": summary_short(summary)})
    return summary


# --------------------------------------------------------------------------------------------------
# 3. Teacher DiT
# --------------------------------------------------------------------------------------------------


def dit_config(sizes: Sizes, text_len: int) -> wan_dit.WanDiTConfig:
    return wan_dit.WanDiTConfig(dim=sizes.dit_dim, num_layers=sizes.dit_layers, self_attn_heads=sizes.dit_heads,
                                cross_attn_heads=sizes.dit_heads, ffn_dim=sizes.dit_ffn,
                                head_dim=sizes.dit_dim // sizes.dit_heads, text_dim=TEXT_DIM, text_len=text_len,
                                patch_size=[1, sizes.dit_patch, sizes.dit_patch])


def caption_table(out: Path, scenes: list) -> tuple[np.ndarray, dict[str, int]]:
    """Runtime text embeddings (``umt5.encode_prompts``, exactly what ``generate`` computes) of every caption
    the scenes can get and of the empty prompt (the CFG branch and the dropped caption): ``[N, text_len, dim]``."""
    from ..tokenizer import load_tokenizer

    tok = load_tokenizer(out)
    enc = umt5.load(out)
    texts = [""] + sorted({c for s in scenes for c in world.scene_captions(s)})
    rows = []
    for s in range(0, len(texts), 256):
        rows.append(np.array(umt5.encode_prompts(enc, tok, texts[s:s + 256])))
    return np.concatenate(rows), {t: i for i, t in enumerate(texts)}


def latent_pool(out: Path, seed: int, clips: int, images: int, progress: bool) -> dict:
    """Autoencoder latents of a fixed, seeded pool of clips and images (encoded once, in batches)."""
    ae = taehv.load(out, encoder=True)
    rng = np.random.default_rng([seed, 3])
    pool = {}
    for kind, n, frames in (("clips", clips, world.FRAMES), ("images", images, 1)):
        scenes = [world.sample_scene(rng) for _ in range(n)]
        lat = []
        it = range(0, n, 8)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=f"encode {kind}", unit="batch", leave=False)
        for s in it:
            x = mx.array(np.stack([world.render_clip(sc, frames) for sc in scenes[s:s + 8]]))
            z = taehv.encode(ae, x)
            mx.eval(z)
            lat.append(np.array(z))
        pool[kind] = (np.concatenate(lat), scenes)
    return pool


def shifted_sigmas(u: np.ndarray, shift: float = TRAIN_SHIFT) -> np.ndarray:
    return shift * u / (1 + (shift - 1) * u)


def train_teacher(out: Path, steps: int, seed: int, resume: bool, sizes: Sizes, checkpoint_every: int = 100,
                  lr: float = 1e-3, progress: bool = True, stop_after: int | None = None) -> dict:
    config = read_config(out) if (out / CONFIG_NAME).exists() else {}
    missing = [name for name, stage in (("decoder", "autoencoder"), ("text_encoder", "text")) if name not in config]
    if missing:
        need = " and ".join(f"`mlx-video recipe {s} --out {out}`" for n, s in
                            (("decoder", "autoencoder"), ("text_encoder", "text")) if n in missing)
        raise RecipeError(f"{out} has no {' or '.join(missing)} yet; the teacher trains on them: run {need} first")
    if not config["decoder"].get("has_encoder"):
        raise RecipeError(f"{out}: the autoencoder has no encoder weights; the teacher needs them to make latents")
    text_len = int(config["text_encoder"]["text_len"])
    cfg = dit_config(sizes, text_len)
    hparams = {"config": config_to_dict(cfg), "batch": sizes.dit_batch, "lr": lr, "pool": [sizes.pool_clips,
               sizes.pool_images], "shift": TRAIN_SHIFT, "caption_dropout": CAPTION_DROPOUT,
               "decoder_sha": config["decoder"].get("summary"), "text_sha": config["text_encoder"]["tokenizer_sha256"]}
    stage = Stage("teacher", out, steps, seed, hparams, checkpoint_every, resume, lr=lr, warmup=100,
                  weight_decay=0.01, progress=progress, stop_after=stop_after)
    check_stage(stage)  # before the (slow) latent pool
    t0 = time.perf_counter()
    pool = latent_pool(out, seed, sizes.pool_clips, sizes.pool_images, progress)
    table, index = caption_table(out, pool["clips"][1] + pool["images"][1])
    prep_seconds = time.perf_counter() - t0
    empty = index[""]
    _seed_init(seed, 3)
    model = wan_dit.WanDiT(cfg)
    model.head.linear.weight = mx.zeros_like(model.head.linear.weight)  # DiT-style zero-initialised output

    def batch_fn(step):
        rng = np.random.default_rng([seed, step, 3])
        kind = "images" if rng.uniform() < sizes.image_fraction else "clips"
        latents, scenes = pool[kind]
        idx = rng.integers(len(scenes), size=sizes.dit_batch)
        x0 = latents[idx]
        caps = [world.caption(scenes[i], rng, image=kind == "images") for i in idx]
        rows = [empty if rng.uniform() < CAPTION_DROPOUT else index[c] for c in caps]
        sigma = shifted_sigmas(rng.uniform(size=len(idx)))
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        s = sigma.reshape(-1, 1, 1, 1, 1).astype(np.float32)
        xt = (1 - s) * x0 + s * eps
        tf = wan_dit.sinusoidal_embedding(sigma * NUM_TRAIN_TIMESTEPS, cfg.freq_dim)
        return mx.array(xt), tf, mx.array(table[rows]), mx.array(eps - x0)

    def loss_fn(model, xt, tf, ctx, target):
        return mx.mean((nets.dit_forward(model, xt, tf, ctx) - target) ** 2)

    summary = run(stage, model, loss_fn, batch_fn)
    summary["prepare_seconds"] = round(prep_seconds, 2)
    if not summary["finished"]:
        return summary
    latents = pool["clips"][0]
    summary["latent_std"] = float(latents.std())
    write_component(out, {wan_dit.WEIGHTS_NAME: _flat(model)}, "dit", {
        **config_to_dict(cfg), "weights_file": wan_dit.WEIGHTS_NAME, "dtype": "float32",
        "parameters": parameter_count(model), "source_layout": "mlx-video recipe teacher",
        "recipe": summary_short(summary) | {"prepare_seconds": summary["prepare_seconds"]}},
        extra={"sampler": {"name": "unipc", "steps": 50, "shift": TRAIN_SHIFT, "guidance": 5.0},
               "world": {"height": world.RESOLUTION, "width": world.RESOLUTION, "frames": world.FRAMES,
                         "fps": world.FPS, "note": "trained on the mlx-video recipe shapes world; see "
                                                   "`mlx-video eval` for its prompt-faithfulness score"}})
    return summary
