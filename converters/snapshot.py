"""Find the components of a downloaded Wan2.1-T2V-1.3B snapshot by content (``convert --hf-path``).

Layouts (``shared/reference/checkpoints.md`` §5):
- original ``Wan-AI/Wan2.1-T2V-1.3B``: root ``config.json`` with ``_class_name: WanModel``, DiT
  ``diffusion_pytorch_model*.safetensors``, ``models_t5_umt5-xxl-enc-bf16.pth``, ``google/umt5-xxl/spiece.model``,
  ``Wan2.1_VAE.pth``;
- Diffusers ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` (and FastWan, SF-as-Diffusers): ``model_index.json`` naming the
  pipeline, with ``transformer/``, ``text_encoder/``, ``tokenizer/spiece.model``, ``vae/``.
A repo id resolves from the Hugging Face cache only (nothing is downloaded); when it is not there, the error
gives the exact ``hf download`` command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlx_video.inputs import InputError, read_json
from mlx_video.utils import ModelPathError, UsageError

# Diffusers pipeline class -> the preset its DiT was made for (checkpoints.md §4.1, §5.2, §5.3)
PIPELINE_PRESETS = {"WanPipeline": "wan2.1", "WanDMDPipeline": "fastwan", "WanCausalDMDPipeline": "self-forcing"}
COMPONENTS = ("dit", "text_encoder", "tokenizer", "vae")


@dataclass
class Snapshot:
    folder: Path
    layout: str  # "wan" (original Wan-AI files) or "diffusers"
    pipeline: str  # root config's / model_index's _class_name
    files: dict[str, Path | None] = field(default_factory=dict)  # component -> path (None: not in the snapshot)

    @property
    def preset(self) -> str | None:
        return "wan2.1" if self.layout == "wan" else PIPELINE_PRESETS.get(self.pipeline)


def looks_like_repo_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and all(text.split("/"))


def download_command(repo: str) -> str:
    return f"hf download {repo}"


def resolve(path_or_repo: str) -> Path:
    """A local folder, or a repo id's snapshot in the Hugging Face cache (offline)."""
    folder = Path(path_or_repo).expanduser()
    if folder.is_dir():
        return folder
    if not looks_like_repo_id(str(path_or_repo)):
        raise UsageError(f"--hf-path {path_or_repo}: no such folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(path_or_repo), local_files_only=True))
    except Exception:  # noqa: BLE001 - the hub raises several types for "not cached"
        raise ModelPathError(f"--hf-path {path_or_repo}: not a folder and not in the Hugging Face cache; download it "
                             f"first:\n  {download_command(path_or_repo)}\nthen "
                             f"run this command again") from None


def _json(path: Path) -> dict:
    try:
        return read_json(path, path.name)
    except InputError as exc:
        raise UsageError(f"--hf-path: {exc}") from None


def _first(*candidates: Path) -> Path | None:
    return next((p for p in candidates if p.exists()), None)


def find(folder: Path) -> Snapshot:
    """The snapshot's layout and component paths, from its files' content (``model_index.json``, ``config.json``)."""
    if (folder / "model_index.json").is_file():
        index = _json(folder / "model_index.json")
        pipeline = str(index.get("_class_name", ""))
        sub = {"dit": "transformer", "text_encoder": "text_encoder", "vae": "vae"}
        files = {name: folder / d if (folder / d).is_dir() else None for name, d in sub.items()}
        files["tokenizer"] = _first(folder / "tokenizer" / "spiece.model")
        return Snapshot(folder, "diffusers", pipeline, files)
    config = _json(folder / "config.json") if (folder / "config.json").is_file() else {}
    if config.get("_class_name") == "WanModel" or any(folder.glob("diffusion_pytorch_model*.safetensors*")):
        if config.get("model_type", "t2v") != "t2v":
            raise UsageError(f"--hf-path {folder}: a Wan {config.get('model_type')!r} model; only text-to-video "
                             f"(t2v) is supported")
        files = {"dit": folder if any(folder.glob("diffusion_pytorch_model*.safetensors")) else None,
                 "text_encoder": next(iter(sorted(folder.glob("models_t5_umt5-xxl-enc-*.pth"))), None),
                 "tokenizer": _first(folder / "google" / "umt5-xxl" / "spiece.model", folder / "spiece.model"),
                 "vae": _first(folder / "Wan2.1_VAE.pth")}
        return Snapshot(folder, "wan", str(config.get("_class_name", "WanModel")), files)
    raise UsageError(f"--hf-path {folder}: not a Wan2.1 snapshot: it has neither model_index.json (Diffusers layout) "
                     f"nor a config.json with _class_name WanModel (original Wan-AI layout). A single DiT checkpoint "
                     f"goes with --dit (plus --hf-path BASE for the text encoder and tokenizer)")


def base_head_dim(snap: Snapshot) -> int | None:
    """The base model's attention head width from its config (for a distilled ``--dit`` file without one)."""
    path = snap.folder / ("config.json" if snap.layout == "wan" else "transformer/config.json")
    if not path.is_file():
        return None
    config = _json(path)
    if isinstance(config.get("attention_head_dim"), int):
        return config["attention_head_dim"]
    dim, heads = config.get("dim"), config.get("num_heads")
    return dim // heads if isinstance(dim, int) and isinstance(heads, int) and heads > 0 and dim % heads == 0 else None


def missing_report(snap: Snapshot, wanted: list[str]) -> str:
    names = {"dit": "DiT", "text_encoder": "UMT5 text encoder", "tokenizer": "tokenizer (spiece.model)",
             "vae": "Wan VAE"}
    return ", ".join(names[w] for w in wanted if snap.files.get(w) is None)
