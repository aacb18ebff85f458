"""The learning-rate sweep: its plan (adaptive second seed), its resumable store, its summary
numbers, its command line, and a smoke test of ``--quick`` end to end (what CI runs)."""

import json
import math
from argparse import Namespace

import pytest
import torch

from magneto.examples import stability, stability_report, sweep
from magneto.examples.stability import Run, Setup


@pytest.fixture(autouse=True)
def _restore_threads():
    """The sweep sets torch's thread count; give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------- plan


@pytest.mark.parametrize(
    "diverged, edges",
    [
        ({1e-3: False, 1e-2: False, 1e-1: True, 1.0: True}, [1e-2, 1e-1]),
        ({1e-3: True, 1e-2: True}, [1e-3]),  # nothing stable: the lowest rate
        ({1e-3: False, 1e-2: False}, [1e-2]),  # nothing diverged: the highest
        ({1e-3: True, 1e-2: False, 1e-1: False, 1.0: True}, [1e-1, 1.0]),  # from the lowest stable
        ({1e-2: True, 1e-3: False}, [1e-3, 1e-2]),  # any key order
    ],
)
def test_edge_lrs(diverged, edges):
    assert sweep.edge_lrs(diverged) == edges


def _args(**changes):
    return Namespace(
        **{
            **dict(
                schemes=["post", "subln"], depths=[4], lrs=[1e-3, 1e-2, 1e-1], warmups=[0], seeds=3
            ),
            **changes,
        }
    )


def test_first_pass_is_the_whole_grid_with_seed_zero():
    runs = sweep.first_pass(_args(warmups=[0, 5]))
    assert len(runs) == len(set(runs)) == 2 * 1 * 3 * 2
    assert {r.seed for r in runs} == {0} and {r.warmup for r in runs} == {0, 5}


def test_second_pass_reruns_the_edges_with_more_seeds():
    args = _args()
    records = {
        Run("post", 4, lr, 0, 0): {"diverged": lr > 5e-3} for lr in args.lrs
    }  # Post-LN: edge between 1e-3 and 1e-2
    records.update({Run("subln", 4, lr, 0, 0): {"diverged": False} for lr in args.lrs})
    runs = sweep.second_pass(args, records)
    assert sorted((r.scheme, r.lr, r.seed) for r in runs) == [
        ("post", 1e-3, 1),
        ("post", 1e-3, 2),
        ("post", 1e-2, 1),
        ("post", 1e-2, 2),
        ("subln", 1e-1, 1),  # never diverged: the highest rate
        ("subln", 1e-1, 2),
    ]
    del records[Run("subln", 4, 1e-2, 0, 0)]  # an unfinished first pass plans nothing there
    assert {r.scheme for r in sweep.second_pass(args, records)} == {"post"}
    assert sweep.second_pass(_args(seeds=1), records) == []


# ------------------------------------------------------------------------------------ store


def test_store_keeps_each_setup_apart_and_skips_cut_lines(tmp_path):
    path = tmp_path / sweep.RUNS_FILE
    a, b = Setup(steps=10), Setup(steps=20)
    run = Run("pre", 2, 1e-3, 0, 0)
    for setup, loss in ((a, 1.0), (b, 2.0), (a, 3.0)):  # a later line of a run replaces it
        sweep.append_record(path, {"setup": vars(setup), "run": vars(run), "final_loss": loss})
    with open(path, "a") as f:
        f.write('{"setup": {"width": 6')  # a line cut short by a killed process
    assert sweep.load_records(path, a) == {
        run: {"setup": vars(a), "run": vars(run), "final_loss": 3.0}
    }
    assert sweep.load_records(path, b)[run]["final_loss"] == 2.0
    assert sweep.load_records(tmp_path / "missing.jsonl", a) == {}


# ---------------------------------------------------------------------------------- summary


def _record(final, initial=6.0, diverged=False):
    return {"final_loss": final, "initial_loss": initial, "diverged": diverged}


def test_effective_loss_caps_at_the_initial_loss():
    assert stability_report.effective_loss(_record(2.5)) == 2.5
    assert stability_report.effective_loss(_record(7.0)) == 6.0  # worse than it started
    assert stability_report.effective_loss(_record(2.5, diverged=True)) == 6.0
    assert stability_report.effective_loss(_record(None, diverged=True)) == 6.0


def test_sensitivity_and_rate_ranges():
    lrs = [1e-4, 3e-4, 1e-3, 1e-2, 1e-1]
    by_lr = {
        1e-4: [_record(3.5)],  # above the unigram baseline of 3.2: stable, but learns nothing
        3e-4: [_record(3.15)],  # under the baseline by less than LEARN_MARGIN: learns nothing
        1e-3: [_record(2.0), _record(2.2)],  # two seeds: mean 2.1
        1e-2: [_record(2.5), _record(None, diverged=True)],  # one seed diverged: unstable
        1e-1: [_record(None, diverged=True)],
    }
    s = stability_report.summarise(by_lr, lrs, unigram=3.2)
    assert s["losses"] == pytest.approx({1e-4: 3.5, 3e-4: 3.15, 1e-3: 2.1, 1e-2: 4.25, 1e-1: 6.0})
    assert s["best_lr"] == 1e-3 and s["best_loss"] == pytest.approx(2.1) and s["initial"] == 6.0
    # Wortsman et al.: mean over rates of min(loss, initial) minus the best loss.
    assert s["sensitivity"] == pytest.approx((3.5 + 3.15 + 2.1 + 4.25 + 6.0) / 5 - 2.1)
    assert s["stable"] == [1e-4, 3e-4, 1e-3] and s["learns"] == [1e-3]
    assert s["seeds"] == {1e-4: 1, 3e-4: 1, 1e-3: 2, 1e-2: 2, 1e-1: 1}
    assert stability_report.rate_range(s["stable"], s) == "0.0001 – 0.001"
    assert stability_report.rate_range(s["learns"], s) == "0.001"
    by_lr[1e-3] = [_record(None, diverged=True)]
    by_lr[1e-2] = [_record(2.4)]
    gap = stability_report.summarise(by_lr, lrs, unigram=3.2)
    assert stability_report.rate_range(gap["stable"], gap) == "0.0001, 0.0003, 0.01"
    none = stability_report.summarise({1e-4: [_record(None, diverged=True)]}, lrs, unigram=3.2)
    assert stability_report.rate_range(none["stable"], none) == "none"
    assert none["sensitivity"] == 0.0 and none["learns"] == []


# ----------------------------------------------------------------------------- command line


def test_help_names_every_knob(capsys):
    with pytest.raises(SystemExit):
        stability.parse_args(["--help"])
    text = capsys.readouterr().out
    knobs = [*(f"--{n.replace('_', '-')}" for n in vars(Setup())), "--quick", "--replot"]
    knobs += ["--schemes", "--depths", "--lrs", "--warmups", "--seeds", "--jobs", "--threads"]
    knobs += ["--out-dir", "--measure-update", "--update-lr"]
    assert all(k in text for k in knobs), [k for k in knobs if k not in text]


def test_presets_and_their_overrides():
    full, quick = stability.parse_args([]), stability.parse_args(["--quick", "--steps", "12"])
    assert full.depths == stability.FULL["depths"] and full.steps == Setup().steps
    assert quick.depths == stability.QUICK["depths"] and quick.steps == 12
    assert stability.setup_of(quick).width == stability.QUICK["width"]
    for bad in (["--steps", "0"], ["--warmups", "150"], ["--lrs", "0"], ["--depths", "0"]):
        with pytest.raises(SystemExit):
            stability.parse_args(bad)


# ------------------------------------------------------------------------------ smoke test


def _strict(line):
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the store"))


def test_quick_sweep_end_to_end(tmp_path, monkeypatch):
    """``--quick`` as CI runs it: every output written and sane, a rerun trains nothing."""
    argv = ["--quick", "--jobs", "1", "--out-dir", str(tmp_path)]
    stability.main(argv)
    args = stability.parse_args(argv)
    lines = (tmp_path / sweep.RUNS_FILE).read_text().splitlines()
    records = [_strict(line) for line in lines]
    first = len(args.schemes) * len(args.depths) * len(args.lrs) * len(args.warmups)
    seeds = [r for r in records if r["run"]["seed"] > 0]
    assert len(records) - len(seeds) == first and 0 < len(seeds) <= 2 * first // len(args.lrs)
    for r in records:
        assert r["setup"] == vars(stability.setup_of(args))
        assert math.isfinite(r["initial_loss"]) and r["initial_loss"] > 5.0
        assert r["diverged"] == (r["diverged_step"] is not None) == bool(r["reason"])
        assert r["diverged"] or r["final_loss"] < r["initial_loss"]
        assert r["cpu_seconds"] > 0 and r["parameters"] > 0 and r["train_curve"]
    deepest = max(args.depths)

    def post(lr):
        return [
            r for r in records if r["run"] == dict(r["run"], scheme="post", layers=deepest, lr=lr)
        ]

    # Post-LN at depth: the highest rate diverges (for every seed), the lowest does not.
    assert post(max(args.lrs)) and all(r["diverged"] for r in post(max(args.lrs)))
    assert post(min(args.lrs)) and not any(r["diverged"] for r in post(min(args.lrs)))
    table = (tmp_path / "stability.md").read_text()
    assert table.count("| Post-LN |") == 2 + len(args.depths) + 1  # one row in every table
    assert "### Learning rates, no warm-up" in table and "LR sensitivity" in table
    for name in ("stability.png", "stability-sensitivity.png"):
        assert (tmp_path / name).stat().st_size > 10_000

    # Resumed: nothing left to train, the store unchanged; --replot redraws the same table.
    monkeypatch.setattr(sweep, "train_run", lambda *a: pytest.fail("trained a finished run"))
    stability.main(argv)
    assert (tmp_path / sweep.RUNS_FILE).read_text().splitlines() == lines
    (tmp_path / "stability.md").unlink()
    stability.main([*argv, "--replot"])
    assert (tmp_path / "stability.md").read_text() == table


def test_worker_processes_give_the_same_runs(tmp_path):
    """The default runner (``--jobs`` > 1: spawned workers) records what the in-process one does."""
    argv = ["--quick", "--schemes", "post", "--depths", "2", "--lrs", "1e-3", "1", "--seeds", "1"]
    results = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        stability.main([*argv, "--jobs", str(jobs), "--out-dir", str(out)])
        records = [json.loads(line) for line in (out / sweep.RUNS_FILE).read_text().splitlines()]
        results[jobs] = {
            json.dumps(r["run"], sort_keys=True): (r["final_loss"], r["diverged"]) for r in records
        }
    assert len(results[1]) == 2 and results[1] == results[2]
