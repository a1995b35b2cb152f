"""scripts/gpu_bench.py runs end to end on the CPU at tiny size (--tiny), so the GPU run is ready."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_tiny_run_reports_times_estimates_and_missing_formats(tmp_path):
    report = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_bench.py"), "--tiny", "--batches", "1",
           "--only", "offload text+map", "--json", str(report)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    rep = json.loads(report.read_text())
    runs = [r for r in rep["runs"] if "skipped" not in r]
    assert [r["batch"] for r in runs] == [1] and all(r["mode"] == "dense offload text+map (default)" for r in runs)
    for r in runs:
        assert r["seconds_per_tile"] > 0 and len(r["scale_s"]) == 3 and r["estimate_GB"] > 0
        assert r["output"] == [r["batch"], 3, 512, 512] and r["peak_GB"] is None  # no device memory on the CPU
    assert set(rep["vae_decode_layouts_s"]) == {"contiguous", "channels_last"}
    skipped = [r for r in rep["runs"] if "skipped" in r]
    from nsarm_nodes.transformer import WEIGHT_FORMATS

    assert bool(skipped) == ("q8_0" not in WEIGHT_FORMATS)  # a clear line instead of a crash
    assert all("q8_0" in r["skipped"] for r in skipped)
    assert "s/tile" in out.stdout and "est GB" in out.stdout
