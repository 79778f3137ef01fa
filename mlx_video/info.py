"""``mlx-video info``: what a converted model folder holds."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from .safetensors_io import read_safetensors_header
from .utils import read_config, resolve_model_path

_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1,
          "U8": 1, "BOOL": 1}


def describe(folder) -> dict:
    folder = Path(folder)
    config = read_config(folder)
    report = {"path": str(folder), "components": {}}
    for name, section in config.items():
        if not isinstance(section, dict):
            continue
        entry = {"config": section}
        wfile = section.get("weights_file")
        if wfile and (folder / wfile).exists():
            header = read_safetensors_header(folder / wfile)
            params, nbytes = Counter(), Counter()
            for info in header.values():
                params[info["dtype"]] += math.prod(info["shape"])
                nbytes[info["dtype"]] += info["data_offsets"][1] - info["data_offsets"][0]
            entry.update(tensors=len(header), elements_by_dtype=dict(params), bytes_by_dtype=dict(nbytes),
                         file_bytes=(folder / wfile).stat().st_size)
        report["components"][name] = entry
    return report


def summary(report: dict) -> str:
    """One line: the checkpoint family (``convert --preset``), its sampler and the LoRAs merged at conversion."""
    comps = report["components"]
    sampler = comps.get("sampler", {}).get("config", {})
    dit = comps.get("dit", {}).get("config", {})
    loras = ", ".join(f"{x.get('file')}:{x.get('scale', 1):g}" for x in dit.get("loras", []) if isinstance(x, dict))
    steps = sampler.get("steps") or len(sampler.get("denoising_step_list") or [])
    return (f"preset: {sampler.get('preset', 'none')}; sampler: {sampler.get('name', 'default')}"
            + (f" ({steps} steps, guidance {sampler.get('guidance', 1)})" if sampler else "")
            + f"; LoRAs merged: {loras or (dit.get('lora_merged') or 'none')}"
            + (f"; pruned ({dit['pruned'].get('method')})" if isinstance(dit.get("pruned"), dict) else ""))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="describe a converted model folder",
                              description="Print each component's config, tensor count and bytes per dtype.")
    from .cli import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from .cli import model_argument

    report = describe(resolve_model_path(model_argument(args)))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(report["path"])
    print(summary(report))
    for name, entry in report["components"].items():
        cfg = entry["config"]
        print(f"\n[{name}]")
        for k, v in cfg.items():
            if isinstance(v, list) and len(v) > 8 and len(set(v)) == 1:
                v = f"{v[0]} (x{len(v)})"
            print(f"  {k}: {v}")
        if "tensors" in entry:
            print(f"  tensors: {entry['tensors']}")
            for dt, n in entry["elements_by_dtype"].items():
                print(f"  {dt}: {n:,} elements, {entry['bytes_by_dtype'][dt] / 1e6:,.1f} MB")
            print(f"  file: {entry['file_bytes'] / 1e6:,.1f} MB")
    return 0
