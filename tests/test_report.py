"""The parity-and-speed report (``python -m magneto.report``) at tiny sizes: its JSON, its
parity numbers, its ratio statistics on a synthetic timer, and its errors for bad flags."""

import json
import math
import os
import re

import pytest
import torch

from magneto.report import cli, harness, readme


def test_interleaved_rounds_rotate_and_ratios_are_per_round():
    # A synthetic timer: variant "a" takes 2, 4, 6 s in rounds 1–3, "b" 1, 1, 3 s.
    planned = {"a": iter([2.0, 4.0, 6.0]), "b": iter([1.0, 1.0, 3.0])}
    calls = []

    def timer(fn):
        name = fn()
        calls.append(name)
        return next(planned[name])

    times = harness.interleaved(
        {"a": lambda: "a", "b": lambda: "b"}, rounds=3, timer=timer, warmup=0
    )
    assert times == {"a": [2.0, 4.0, 6.0], "b": [1.0, 1.0, 3.0]}
    assert calls == ["a", "b", "b", "a", "a", "b"]  # the order rotates by one per round
    stats = harness.ratio_stats(times["a"], times["b"])  # per-round ratios 2, 4, 2
    assert (stats.median, stats.lo, stats.hi, stats.rounds) == (2.0, 2.0, 4.0, 3)
    assert str(stats) == "2.000 (2.000–4.000)"
    # Not the ratio of medians (4 / 1): a slow round slows both variants alike.
    assert harness.time_stats(times["a"]) == {"median_s": 4.0, "min_s": 2.0, "max_s": 6.0}


def test_interleaved_rounds_stop_at_the_budget_after_the_least():
    """Rounds start while the time so far is within the budget, and at least min_rounds run."""
    import time

    def slow():
        time.sleep(0.02)

    ticks = []
    times = harness.interleaved(
        {"a": slow, "b": slow},
        rounds=50,
        timer=lambda f: f() or 1.0,
        warmup=0,
        tick=lambda: ticks.append(1),
        budget_s=0.15,
        min_rounds=2,
    )
    assert 2 <= len(times["a"]) == len(times["b"]) < 50
    assert len(ticks) == 50  # a progress bar still reaches its end
    few = harness.interleaved(
        {"a": slow}, rounds=4, timer=lambda f: f() or 1.0, warmup=0, budget_s=0.0, min_rounds=3
    )
    assert len(few["a"]) == 3


def test_harness_refuses_what_it_cannot_summarise():
    with pytest.raises(ValueError, match="equally many rounds"):
        harness.ratio_stats([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        harness.interleaved({"a": lambda: None}, rounds=0, timer=harness.cpu_timer())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--backends", "nope"], "unknown backend 'nope'"),
        (["--backends", "reference"], "'reference' is the eager comparator"),
        (["--backends", "cuda"], "cannot run on cpu"),
        # The Triton interpreter (TRITON_INTERPRET=1, the suite's default) is never timed.
        (["--backends", "triton", "--sections", "ops"], "checked in parity only|cannot run on cpu"),
        (["--d", "100", "--heads", "12"], "must be divisible by --heads"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--decode-rows", "0"], "--decode-rows must all be >= 1"),
        (["--sections", "ops", "--skip", "ops"], "nothing left to run"),
        (["--sections", "speed"], "invalid choice: 'speed'"),
        (["--dtype", "float16"], "invalid choice: 'float16'"),
    ],
)
def test_bad_flags_exit_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(flags + ["--device", "cpu"])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_report_json_md_png(tmp_path, one_thread, capsys):
    sections = ["parity", "models", "memory", "ops", "layers", "decode"]  # compile: too slow here
    assert (
        cli.main(
            [
                "--quick",
                "--device",
                "cpu",
                "--backends",
                "cpu",
                "--rounds",
                "1",
                "--threads",
                "1",
                "--decode-rows",
                "2",
                "--sections",
                *sections,
                "--out-dir",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    files = {p.suffix: p for p in tmp_path.iterdir()}
    assert set(files) == {".json", ".md", ".png"}
    assert all(p.name.startswith("report-cpu-float32-") for p in files.values())
    report = json.loads(files[".json"].read_text())
    assert {
        "command",
        "machine",
        "settings",
        "parity_ops",
        "parity_models",
        "memory",
        "speed",
        "goals",
        "runtime_s",
    } <= set(report)
    assert report["settings"]["backends"] == ["cpu"]
    assert report["settings"]["parity_backends"] == ["reference", "cpu"]
    assert {"cpu", "threads", "torch", "triton", "cpu_gemm_engine", "date"} <= set(
        report["machine"]
    )

    ops = {(r["op"], r["dtype"], r["backend"]) for r in report["parity_ops"]}
    assert ops == {
        (op, dt, be)
        for op in ("layer_norm", "add_layer_norm", "ln_linear")
        for dt in ("float32", "bfloat16")
        for be in ("reference", "cpu")
    }
    for r in report["parity_ops"]:
        for part in ("output", "grads"):
            e = r[part]
            assert math.isfinite(e["rel_err"]) and e["rel_err"] < e["rel_bound"] and e["ok"], r
    models = {(r["model"], r["backend"]) for r in report["parity_models"]}
    assert {("encoder", "cpu"), ("decoder", "cpu"), ("encoder_decoder", "cpu")} <= models
    for r in report["parity_models"]:
        assert math.isfinite(r["output_rel_err"]) and r["output_rel_err"] < 1e-5, r
        assert r["grad_rel_err"] is None or r["grad_rel_err"] < 1e-5, r

    groups = {(r["group"], r["pass"]) for r in report["speed"]}
    assert groups == {
        ("ops", "fwd"),
        ("ops", "fwd+bwd"),
        ("layers", "fwd"),
        ("layers", "fwd+bwd"),
        ("decode", "no_grad"),
    }
    for r in report["speed"]:
        assert "magneto cpu" in r["times"] and "eager reference" in r["times"]
        assert r["floors"] and set(r["floors"]) <= set(r["ratios"]["cpu"])
        for stats in r["ratios"]["cpu"].values():
            assert 0 < stats["lo"] <= stats["median"] <= stats["hi"] and stats["rounds"] == 1
    layers = [r for r in report["speed"] if r["group"] == "layers"]
    assert all("torchscale" in r["ratios"]["cpu"] for r in layers)
    measured = {g["comparator"]: g["holds"] is not None for g in report["goals"]}
    assert measured == {
        "floor: same GEMM engine": True,
        "torchscale": True,
        "torch.compile(reference)": False,
    }  # the compile section was left out
    saved = {(r["layer"], r["model"]): r["d_vectors_per_token"] for r in report["memory"]}
    assert saved[("encoder", "magneto cpu")] < saved[("encoder", "torchscale")]

    md = files[".md"].read_text()
    assert md in capsys.readouterr().out
    for title in (
        "Parity: every op against float64",
        "Parity: whole models against torchscale",
        "Speed: one Sub-LN layer",
        "Speed: decoding",
        "Memory: saved for backward",
    ):
        assert title in md

    # The README's results block is generated from the JSON, between its markers.
    old = "intro\n<!-- report:cpu-float32:start -->\nstale\n<!-- report:cpu-float32:end -->\nrest\n"
    new = readme.replace_block(old, "cpu-float32", readme.section(report, str(files[".json"])))
    assert new.startswith("intro\n<!-- report:cpu-float32:start -->\nMeasured ")
    assert "stale" not in new and new.endswith("<!-- report:cpu-float32:end -->\nrest\n")
    with pytest.raises(ValueError, match="no <!-- report:cpu-bfloat16:start -->"):
        readme.replace_block(old, "cpu-bfloat16", "body")


def test_readme_blocks_are_their_committed_reports():
    """Each README results block is what `magneto.report.readme` makes of the committed JSON it
    links (no number typed by hand, none left stale by a new report), and both dtypes have one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        text = f.read()
    blocks = re.findall(r"<!-- report:(\S+):start -->\n(.*?)\n<!-- report:\1:end -->", text, re.S)
    assert {name for name, _ in blocks} >= {"cpu-float32", "cpu-bfloat16"}
    for name, body in blocks:
        md_path = re.search(r"full report: \[[^\]]+\]\(([^)]+)\.md\)", body).group(1)
        json_path = md_path + ".json"
        with open(os.path.join(root, json_path)) as f:
            report = json.load(f)
        settings = report["settings"]
        assert f"{settings['device']}-{settings['dtype']}" == name
        assert readme.section(report, json_path) == body
