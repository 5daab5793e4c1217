"""The 30-second soak: policy_node with the student at 500 Hz against arm_sim_node, both their own processes."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("rclpy")

from vdd_ros.ros.processes import ros_environment  # noqa: E402
from vdd_ros.ros.soak import shm_files  # noqa: E402


@pytest.mark.slow
def test_a_30_second_soak_keeps_memory_flat_and_leaves_no_shared_memory_files(tmp_path, domain_id):
    before = shm_files()
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, "-m", "vdd_ros.cli.main", "bench", "soak", "--minutes", "0.5",
                          "--sample-every", "10", "--warmup", "3", "--json", str(out)],
                         env=ros_environment(domain_id), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert len(result["samples"]) >= 4
    assert result["rss_growth_mib"] <= result["max_growth_mib"] == 8.0
    assert result["exit_codes"] == [0, 0] and result["leaked_shm_files"] == []
    assert result["commands_sent"] > 0.5 * 500 * 30 and result["commands_received"] > 0
    assert shm_files() <= before
    assert "RSS" in run.stdout and "Fast DDS files left in /dev/shm: 0" in run.stdout
