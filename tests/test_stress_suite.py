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


@pytest.fixture()
def cpu_caps():
    """stress/cpu_caps.py, where this machine has a cgroup v1 cpu controller we may write."""
    sys.path.insert(0, str(REPO / "stress"))
    try:
        import cpu_caps
    finally:
        sys.path.pop(0)
    reason = cpu_caps.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return cpu_caps


def _cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return next(line.split(":", 2)[2].strip() for line in f if line.split(":")[1] == "cpu")


@pytest.mark.sqlite_only
def test_cpu_caps_put_a_real_process_in_a_capped_group_and_undo_it(cpu_caps):
    child = subprocess.Popen(["sleep", "60"])
    caps = cpu_caps.CpuCaps(5)
    try:
        group = caps.cap("db0", [child.pid])
        assert (group / "cpu.cfs_quota_us").read_text().split() == ["1000"]
        assert (group / "cpu.cfs_period_us").read_text().split() == ["20000"]   # 5 % of one core
        assert _cgroup_of(child.pid) == f"/{caps.base.name}/db0"
    finally:
        caps.release()
        caps.release()   # twice is harmless (the driver may release on SIGTERM and in finally)
        try:
            assert _cgroup_of(child.pid) == "/"
            assert not caps.base.exists()
        finally:
            child.kill()
            child.wait(5)


@pytest.mark.sqlite_only
def test_cpu_caps_left_by_a_killed_driver_are_removed_at_the_next_start(cpu_caps):
    dead = subprocess.Popen(["true"])
    dead.wait(5)
    stale = cpu_caps.CPU_ROOT / f"{cpu_caps.PREFIX}{dead.pid}"
    child = subprocess.Popen(["sleep", "60"])
    try:
        (stale / "db0").mkdir(parents=True)
        (stale / "db0" / "cgroup.procs").write_text(str(child.pid))
        cpu_caps.remove_stale_groups()
        assert not stale.exists()
        assert _cgroup_of(child.pid) == "/"
    finally:
        child.kill()
        child.wait(5)
        if stale.exists():
            for group in stale.iterdir():
                if group.is_dir():
                    cpu_caps._empty_and_remove(group, cpu_caps.CPU_ROOT)
            stale.rmdir()


@pytest.mark.sqlite_only
def test_cap_db_cpu_refuses_sqlite_with_a_clear_message():
    result = subprocess.run([sys.executable, "stress/run_stress.py", "--cap-db-cpu", "5"],
                            cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--cap-db-cpu caps PostgreSQL servers: add --db postgres" in result.stderr
