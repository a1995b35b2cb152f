"""scripts/gpu_bench.py runs end to end on the CPU at tiny size (--tiny), so the GPU run is ready."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_tiny_run_reports_times_and_estimates_per_format(tmp_path):
    report = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_bench.py"), "--tiny", "--batches", "1",
           "--only", "offload text+map", "--json", str(report)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    rep = json.loads(report.read_text())
    runs = [r for r in rep["runs"] if "skipped" not in r]
    modes = ["dense offload text+map (default)", "q8_0_mixed offload text+map (default)"]
    assert [(r["mode"], r["batch"]) for r in runs] == [(m, 1) for m in modes]
    for r in runs:
        assert r["seconds_per_tile"] > 0 and len(r["scale_s"]) == 3 and r["estimate_GB"] > 0
        assert r["output"] == [r["batch"], 3, 512, 512] and r["peak_GB"] is None  # no device memory on the CPU
    assert set(rep["vae_decode_layouts_s"]) == {"contiguous", "channels_last"}
    assert "s/tile" in out.stdout and "est GB" in out.stdout
