"""``mlx-video bench --import FILE``: device runs beside this machine's rows (``benchmarks/device_import.py``).

The file is what the exported Swift runner writes with ``--bench-json`` (``tests/test_swift_compile.py`` runs
the real runner and imports its file); here a file of the same form checks the merge and the errors without
a Swift toolchain.
"""

from __future__ import annotations

import json

import mlx_video  # noqa: F401  (fast BLAS before mlx)
import pytest

from benchmarks.common import SCHEMA
from benchmarks.device_import import load_device_run, merge
from mlx_video import cli
from mlx_video.utils import UsageError

LABEL = "iPhone 16 Pro Max"


def device_run(label: str = LABEL) -> dict:
    def row(stage, seconds, peak):
        time = {"median_s": seconds, "min_s": seconds, "max_s": seconds, "spread": 0.0, "stdev_s": 0.0, "repeats": 1,
                "samples_s": [seconds]}
        return {"stage": f"model:{stage}", "model": "Model", "shape": "480x832x21", "video": [480, 832, 21],
                "method": f"lightning-video (Swift, mlx-swift) staged pipeline on {label}; one run",
                "mlx": {"time": time, "full_model_time_s": seconds,
                        "memory": {"mlx_peak_bytes": peak, "footprint_bytes": peak + 10**8}}}
    return {"schema": SCHEMA, "mode": "device", "created": "2026-12-01T09:00:00Z",
            "command": "lightning-video Model 'a corgi' --bench-json run.json", "machine": {"label": label},
            "backend": {"mlx_device": "mlx-swift on iPhone17,2"}, "versions": {"lightning-video": "mlx-video/1"},
            "stages": [row("encode", 2.5, 3 << 30), row("denoise", 40.0, 4 << 30), row("decode", 6.0, 1 << 30),
                       row("end_to_end", 48.5, 4 << 30)], "notes": []}


def test_device_rows_join_the_report_beside_the_machine(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps(device_run()))
    out = tmp_path / "bench"
    assert cli.main(["bench", "--quick", "--stages", "matmul", "--no-reference", "--import", str(run),
                     "--out", str(out)]) == 0
    results = json.loads((out / "bench.json").read_text())
    rows = [s for s in results["stages"] if s.get("device") == LABEL]
    assert [r["stage"] for r in rows] == ["model:encode", "model:denoise", "model:decode", "model:end_to_end"]
    assert all(r["model"] == f"Model @ {LABEL}" and r["imported_from"] == str(run) for r in rows)
    assert rows[1]["mlx"]["time"]["median_s"] == 40.0 and rows[1]["mlx"]["memory"]["mlx_peak_bytes"] == 4 << 30
    assert results["device_runs"][0]["label"] == LABEL and results["matmul"]  # the machine's own rows stay
    report = (out / "bench.md").read_text()
    assert f"Model @ {LABEL}" in report and "device run imported from" in report


def test_two_devices_side_by_side():
    results = {"stages": [], "notes": []}
    merge(results, [{**device_run("iPhone 15 Pro"), "file": "a.json"}, {**device_run(), "file": "b.json"}])
    models = {s["model"] for s in results["stages"]}
    assert models == {"Model @ iPhone 15 Pro", f"Model @ {LABEL}"} and len(results["stages"]) == 8


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("not json", "not a benchmark JSON file"),
    (json.dumps({"schema": "other/2", "stages": []}), "schema 'other/2'"),
    (json.dumps({**device_run(), "stages": []}), "holds no stages"),
    (json.dumps({**device_run(), "stages": [{"stage": "model:encode", "model": "Model", "mlx": {}}]}),
     "mlx.time.median_s"),
])
def test_a_bad_import_file_is_a_usage_error(tmp_path, capsys, content, message):
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message):
        load_device_run(path)
    out = tmp_path / "bench"
    assert cli.main(["bench", "--quick", "--stages", "matmul", "--import", str(path), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()  # refused before any timing
