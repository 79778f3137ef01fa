"""Install a distilled recipe model as the package's built-in default: ``python -m mlx_video.recipe.ship
--model <recipe>/distilled``.

Copies the DiT, the autoencoder's decoder (the encoder weights are dropped: generation never encodes), the
text encoder and the tokenizer into ``mlx_video/default_model/`` with a config.json that records where they
came from; training state (``train/``, the DMD critic) never ships.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx

SHIPPED = ("config.json", "dit.safetensors", "decoder.safetensors", "text_encoder.safetensors", "spiece.model")


def ship(model: Path, target: Path, note: dict | None = None) -> int:
    """Write the shipped files of ``model`` into ``target`` (keeps ``target``'s Python files); returns bytes."""
    from ..utils import read_config

    config = read_config(model)
    if config.get("sampler", {}).get("name") != "fewstep" or float(config["sampler"].get("guidance", 1)) > 1:
        raise SystemExit(f"{model}: not a distilled 4-step folder (sampler {config.get('sampler')})")
    target.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED:
        (target / name).unlink(missing_ok=True)
    shutil.copyfile(model / config["dit"]["weights_file"], target / "dit.safetensors")
    shutil.copyfile(model / config["text_encoder"]["weights_file"], target / "text_encoder.safetensors")
    shutil.copyfile(model / config["text_encoder"]["tokenizer_file"], target / "spiece.model")
    decoder = {k: v for k, v in mx.load(str(model / config["decoder"]["weights_file"])).items()
               if not k.startswith("encoder.")}
    mx.save_safetensors(str(target / "decoder.safetensors"), decoder, metadata={"format": "mlx"})
    config["decoder"].update(has_encoder=False, weights_file="decoder.safetensors",
                             parameters=int(sum(v.size for v in decoder.values())))
    config["dit"]["weights_file"] = "dit.safetensors"
    config["text_encoder"].update(weights_file="text_encoder.safetensors", tokenizer_file="spiece.model")
    config["shipped"] = {"from": str(model), **(note or {})}
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sum((target / n).stat().st_size for n in SHIPPED)


README_PROMPTS = ("a red circle moving right on a black background", "a large yellow square moving down on a gray "
                  "background", "a cyan triangle standing still on a black background")


def readme_strip(folder: Path, path: Path, seed: int = 0) -> None:
    """The README's frame strip: what `mlx-video generate --prompt P --seed 0` draws with ``folder``."""
    from .evaluate import Generator, frame_strip

    gen = Generator(folder, {})
    frame_strip(gen.videos(list(README_PROMPTS), seed, len(README_PROMPTS)), list(README_PROMPTS), path,
                rows=len(README_PROMPTS), frames=9)


def main(argv=None) -> int:
    from ..default_model import path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the distilled folder (<recipe>/distilled)")
    p.add_argument("--note", default=None, help="JSON object stored under config.json 'shipped'")
    p.add_argument("--strip", default=None, metavar="PNG", help="also write the README's frame strip here")
    args = p.parse_args(argv)
    size = ship(Path(args.model), path(), json.loads(args.note) if args.note else None)
    print(f"wrote {path()} ({size / 1e6:.2f} MB)", file=sys.stderr)
    if args.strip:
        readme_strip(path(), Path(args.strip))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
