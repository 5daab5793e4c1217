"""vdd bench ros: the figures from publish/arrival times (pure), and one short run over real DDS."""
import json
import subprocess
import sys

import numpy as np
import pytest

from vdd_ros.ros.latency_bench import answered_observations, cell_figures, parse_list, sustained_rate


def test_each_command_is_paired_with_the_newest_observation_before_it():
    published = [0.000, 0.010, 0.020, 0.030]
    arrivals = [0.0015, 0.0112, 0.0330, 0.0335]  # the third observation gets no answer; the fourth two
    figures = cell_figures(published, arrivals, 100.0, 0.04, [0.0002, 0.0004], 0.25, "observation")
    np.testing.assert_allclose(figures["latencies_ms"], [1.5, 1.2, 3.0, 3.5], atol=1e-9)
    assert figures["dropped"] == 1 and figures["misses"] == 1 and figures["miss_share"] == pytest.approx(0.25)
    assert figures["p50_ms"] == pytest.approx(2.25) and figures["max_ms"] == pytest.approx(3.5)
    assert figures["inference_p50_ms"] == pytest.approx(0.3) and figures["cpu_percent"] == 25.0
    late = cell_figures([0.0, 0.001], [0.0025, 0.0026], 1000.0, 0.002, [], 0.0, "timer")
    assert late["misses"] == 2 and late["dropped"] == 0  # both later than one 1 ms period


def test_a_command_sooner_than_any_answer_can_be_answers_the_observation_before():
    # 1 kHz, a node taking 1.4 ms: the answer to observation 0 arrives 0.4 ms after observation 1 was published
    published = [0.000, 0.001, 0.002, 0.003]
    arrivals = [0.0014, 0.0029, 0.0044]
    newest = cell_figures(published, arrivals, 1000.0, 0.004, [0.0003], 0.0, "observation")
    np.testing.assert_allclose(newest["latencies_ms"], [0.4, 0.9, 1.4], atol=1e-9)  # understated
    paired = cell_figures(published, arrivals, 1000.0, 0.004, [0.0003], 0.0, "observation", min_latency_s=0.0008)
    np.testing.assert_allclose(paired["latencies_ms"], [1.4, 0.9, 1.4], atol=1e-9)
    assert list(answered_observations(np.asarray(published), np.asarray(arrivals), 0.0008)) == [0, 2, 3]
    # an observation already answered is not answered twice: the newest stays
    assert list(answered_observations(np.asarray(published), np.asarray([0.0005, 0.0012]), 0.0008)) == [0, 1]


def test_the_sustained_rate_is_the_highest_rate_within_its_period_and_miss_budget():
    cells = [{"rate_hz": 100.0, "p99_ms": 2.0, "miss_share": 0.0}, {"rate_hz": 500.0, "p99_ms": 1.9, "miss_share": 0.0},
             {"rate_hz": 1000.0, "p99_ms": 0.8, "miss_share": 0.002}]
    assert sustained_rate(cells) == 500.0  # 1000 Hz has 0.2% misses
    cells[1]["p99_ms"] = 2.1  # above its 2 ms period
    assert sustained_rate(cells) == 100.0
    assert sustained_rate([{"rate_hz": 50.0, "p99_ms": None, "miss_share": 1.0}]) is None
    with pytest.raises(ValueError, match="--rates: expected comma-separated numbers > 0"):
        parse_list("--rates", "100,-5")


@pytest.mark.slow
def test_a_short_sweep_over_real_dds_writes_table_json_and_plot(tmp_path, domain_id):
    pytest.importorskip("rclpy")
    from vdd_ros.paths import model_file
    from vdd_ros.ros.processes import ros_environment

    out = tmp_path / "ros.json"
    run = subprocess.run([sys.executable, "-m", "vdd_ros.cli.main", "bench", "ros", "--rates", "100",
                          "--triggers", "observation,timer", "--duration", "1.5", "--warmup", "0.5",
                          "--teacher", str(model_file("teacher.onnx")), "--json", str(out),
                          "--plot", str(tmp_path / "ros.png")],
                         env=ros_environment(domain_id), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    models = {(c["model"], c["trigger"]) for c in result["cells"]}
    assert models == {("DDS floor (bare echo)", "observation"), ("student", "observation"), ("student", "timer"),
                      ("teacher 16-step", "observation"), ("teacher 16-step", "timer")}
    for cell in result["cells"]:
        assert cell["commands"] > 50, cell  # 1.5 s at 100 Hz
        assert 0 < cell["p50_ms"] <= cell["p99_ms"] <= cell["max_ms"] < 1000
    student = next(c for c in result["cells"] if c["model"] == "student" and c["trigger"] == "observation")
    teacher = next(c for c in result["cells"] if c["model"] == "teacher 16-step" and c["trigger"] == "observation")
    assert teacher["inference_p50_ms"] > student["inference_p50_ms"]
    assert "highest sustained rate" in run.stdout and (tmp_path / "ros.png").stat().st_size > 10000


@pytest.mark.slow
def test_attach_measures_a_node_that_is_already_running(tmp_path, domain_id):
    pytest.importorskip("rclpy")
    from vdd_ros.paths import config_file
    from vdd_ros.ros.processes import NodeProcess, ros_environment

    env = ros_environment(domain_id)
    sim = NodeProcess("arm_sim_node", tmp_path / "sim.log", env, params_files=[config_file("arm_sim.yaml")])
    policy = NodeProcess("policy_node", tmp_path / "policy.log", env, params_files=[config_file("policy.yaml")])
    try:
        assert policy.wait_for_log("active: commanding", timeout=60), policy.log()
        run = subprocess.run([sys.executable, "-m", "vdd_ros.cli.main", "bench", "ros", "--attach", "/policy_node",
                              "--duration", "3", "--json", str(tmp_path / "a.json"), "--plot", ""],
                             env=env, capture_output=True, text=True, timeout=120)
    finally:
        codes = [policy.stop(), sim.stop()]
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    cell = json.loads((tmp_path / "a.json").read_text())["cells"][0]
    # the rate is read from the first command on (discovery can take much of a 3 s window): the node's 20 Hz
    assert cell["commands"] >= 3 and 12 <= cell["achieved_hz"] <= 28, cell["achieved_hz"]
    assert 0 < cell["p50_ms"] < 100
    assert codes == [0, 0]
