"""`vdd demos` and `vdd render` through the real CLI entry point, including their error paths."""
import argparse
import os

import numpy as np
import pytest

from vdd_ros.cli.main import build_parser, main
from vdd_ros.data.dataset import DemoDataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str):
    lines = [line for line in err.splitlines() if line.startswith("vdd ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def demos_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("demos") / "demos.npz"
    assert main(["demos", "--episodes", "32", "--seed", "1", "--out", str(path)]) == 0
    return path


def test_demos_writes_dataset_plot_and_summary(tmp_path, capsys):
    out_file, plot = tmp_path / "runs" / "demos.npz", tmp_path / "runs" / "demos.png"
    code, out, _ = run_cli(capsys, "demos", "--task", "arm_avoid", "--episodes", "32", "--seed", "0",
                           "--out", str(out_file), "--plot", str(plot))
    assert code == 0
    summary = out.strip().splitlines()[-1]
    assert "episodes=32" in summary and "success=1.0" in summary and "routes_covered=16" in summary
    assert "entropy=1.0" in summary
    dataset = DemoDataset.load(str(out_file), expected_task="arm_avoid")
    assert dataset.n_episodes == 32 and dataset.spec.task == "arm_avoid"
    assert plot.read_bytes()[:8] == PNG_MAGIC
    assert sorted(os.listdir(tmp_path / "runs")) == ["demos.npz", "demos.png"]


def test_demos_same_seed_same_data(tmp_path, demos_file):
    again = tmp_path / "again.npz"
    assert main(["demos", "--episodes", "32", "--seed", "1", "--out", str(again)]) == 0
    a, b = DemoDataset.load(str(demos_file)), DemoDataset.load(str(again))
    np.testing.assert_array_equal(a.observations, b.observations)
    np.testing.assert_array_equal(a.routes, b.routes)


@pytest.mark.parametrize("argv,fragments", [
    (["--task", "pick_place"], ["task", "arm_avoid", "pick_place"]),
    (["--episodes", "0"], ["--episodes", "got 0"]),
    (["--plot", "x.jpg"], ["--plot", ".png", "x.jpg"]),
])
def test_demos_bad_options(tmp_path, capsys, argv, fragments):
    out_file = tmp_path / "d.npz"
    code, _, err = run_cli(capsys, "demos", "--episodes", "4", "--out", str(out_file), *argv)
    assert code == 2
    assert_one_line_error(err, *fragments)
    assert os.listdir(tmp_path) == []


def test_demos_out_must_be_npz(tmp_path, capsys):
    code, _, err = run_cli(capsys, "demos", "--episodes", "4", "--out", str(tmp_path / "d.txt"))
    assert code == 2
    assert_one_line_error(err, "--out", ".npz")
    assert os.listdir(tmp_path) == []


def test_demos_unwritable_out(tmp_path, capsys):
    (tmp_path / "d.npz").mkdir()
    code, _, err = run_cli(capsys, "demos", "--episodes", "4", "--out", str(tmp_path / "d.npz"))
    assert code == 2
    assert_one_line_error(err, "--out", "cannot write")
    assert os.listdir(tmp_path) == ["d.npz"] and os.listdir(tmp_path / "d.npz") == []


def test_render_writes_png(tmp_path, capsys, demos_file):
    png = tmp_path / "render.png"
    code, out, _ = run_cli(capsys, "render", "--dataset", str(demos_file), "--out", str(png), "--max-episodes", "5")
    assert code == 0
    assert "5 of 32 episodes" in out
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert os.listdir(tmp_path) == ["render.png"]


def test_render_missing_dataset(tmp_path, capsys):
    png = tmp_path / "render.png"
    code, _, err = run_cli(capsys, "render", "--dataset", str(tmp_path / "none.npz"), "--out", str(png))
    assert code == 2
    assert_one_line_error(err, "none.npz", "no such file")
    assert os.listdir(tmp_path) == []


def test_render_corrupt_dataset(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a dataset at all")
    code, _, err = run_cli(capsys, "render", "--dataset", str(bad), "--out", str(tmp_path / "render.png"))
    assert code == 2
    assert_one_line_error(err, "bad.npz", "file: expected a readable .npz archive")
    assert os.listdir(tmp_path) == ["bad.npz"]


def test_render_dataset_with_missing_key(tmp_path, capsys, demos_file):
    with np.load(demos_file) as data:
        arrays = {k: data[k] for k in data.files if k != "actions"}
    broken = tmp_path / "broken.npz"
    np.savez(broken, **arrays)
    code, _, err = run_cli(capsys, "render", "--dataset", str(broken), "--out", str(tmp_path / "render.png"))
    assert code == 2
    assert_one_line_error(err, "keys: expected all of", "missing ['actions']")
    assert os.listdir(tmp_path) == ["broken.npz"]


@pytest.mark.parametrize("argv,fragments", [
    (["--out", "render.jpg"], ["--out", ".png"]),
    (["--out", "render.png", "--max-episodes", "0"], ["--max-episodes", "got 0"]),
])
def test_render_bad_options(tmp_path, capsys, demos_file, argv, fragments):
    argv = [str(tmp_path / a) if a.startswith("render.") else a for a in argv]
    code, _, err = run_cli(capsys, "render", "--dataset", str(demos_file), *argv)
    assert code == 2
    assert_one_line_error(err, *fragments)
    assert os.listdir(tmp_path) == []


def test_every_option_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("demos", "render"):
        for action in subparsers.choices[name]._actions:
            assert action.help, f"vdd {name} {action.option_strings} has no help"
