"""The stress suite runs and its output has the promised fields (timings are the suite's job, not ours)."""
import json
import subprocess
import sys

import pytest

from tests.support.lb import REPO


@pytest.mark.sqlite_only
def test_stress_smoke_run_has_every_promised_field(tmp_path):
    out = tmp_path / "smoke.json"
    result = subprocess.run([sys.executable, "stress/run_stress.py", "--smoke", "--json", str(out)],
                            cwd=str(REPO), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    sys.path.insert(0, str(REPO / "stress"))
    try:
        from run_stress import check_promised_fields
    finally:
        sys.path.pop(0)
    assert check_promised_fields(data) == []
    lb_rows = [row for row in data["summary"] if row["target"] == "lb"]
    assert lb_rows and all(row["metrics"]["ops"] > 0 and row["metrics"]["errors"] == 0 for row in lb_rows)
    assert data["consistency"]["lb_item"]["identical"] is True
    for row in lb_rows:
        assert {"p50_ms", "p95_ms", "p99_ms", "ops_per_s", "read_distribution", "coord_rss_mb"} <= set(row["metrics"])
