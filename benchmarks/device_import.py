"""``mlx-video bench --import FILE``: runs measured on a device beside this machine's own rows.

A device run is what the exported Swift runner writes with ``lightning-video MODEL PROMPT --bench-json FILE``
(or an app through ``LightningVideoPipeline.benchmarkJSON``): ``mlx-video bench`` JSON (same schema) with one
row per pipeline stage (``model:encode``, ``model:denoise``, ``model:decode``, ``model:end_to_end``), each with
its wall time and peak memory (``Memory.peakMemory`` and the process footprint). Imported rows keep their
numbers; their model reads ``MODEL @ DEVICE`` so the report's tables show them beside the local rows.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_video.utils import UsageError

from benchmarks.common import SCHEMA


def add_import_argument(p) -> None:
    p.add_argument("--import", dest="import_files", action="append", default=None, metavar="FILE",
                   help="a device run to put beside this machine's rows: the JSON the exported Swift runner writes "
                        "with --bench-json (repeatable)")


def load_device_run(path: str | Path) -> dict:
    """Read and check one device run; a bad file is a usage error (exit 2) raised before any timing."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise UsageError(f"--import {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"--import {path}: not a benchmark JSON file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise UsageError(f"--import {path}: schema {found!r}, expected {SCHEMA!r} (write it with the exported "
                         f"runner: `lightning-video MODEL_DIR PROMPT --bench-json FILE`)")
    rows = doc.get("stages")
    if not isinstance(rows, list) or not rows:
        raise UsageError(f"--import {path}: holds no stages")
    for i, row in enumerate(rows):
        time = row.get("mlx", {}).get("time", {}) if isinstance(row, dict) else {}
        if not (isinstance(row, dict) and isinstance(row.get("stage"), str) and isinstance(row.get("model"), str)
                and isinstance(time, dict) and isinstance(time.get("median_s"), (int, float))):
            raise UsageError(f"--import {path}: stage {i} needs 'stage', 'model' and mlx.time.median_s")
    return {**doc, "file": str(p)}


def label_of(run: dict) -> str:
    machine = run.get("machine") or {}
    return str(machine.get("label") or machine.get("machine") or "device")


def merge(results: dict, runs: list[dict]) -> None:
    """Append each run's rows to ``results["stages"]`` (model renamed ``MODEL @ DEVICE``) and list the runs."""
    for run in runs:
        label = label_of(run)
        for row in run["stages"]:
            results["stages"].append({**row, "model": f"{row['model']} @ {label}", "device": label,
                                      "imported_from": run["file"]})
        results.setdefault("device_runs", []).append(
            {"file": run["file"], "label": label, "created": run.get("created"), "command": run.get("command"),
             "machine": run.get("machine"), "backend": run.get("backend"), "rows": len(run["stages"])})
        results.setdefault("notes", []).append(
            f"device run imported from {run['file']}: {len(run['stages'])} rows as 'model @ {label}' "
            f"(measured {run.get('created', '?')} with `{run.get('command') or 'lightning-video'}`)")
