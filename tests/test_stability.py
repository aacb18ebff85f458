"""The stability sweep's pieces: its data, its divergence rule, its models (the plain-init
ablation included), one training run, and DeepNet's update size. The sweep itself (plan, store,
summary, ``--quick`` end to end) is tested in tests/test_stability_sweep.py.

The update-size test measures, for Post-LN, Pre-LN, DeepNorm, Sub-LN with the plain init and
Magneto (Sub-LN) decoders at depths 6, 24 and 96 (width 16), the relative change of the output
after one Adam step at initialisation, ‖F(x; θ+Δθ) − F(x; θ)‖ / ‖F(x; θ)‖, averaged over three
seeds (float64, so the reference backend: deterministic). Measured with torch 2.13 CPU, lr 1e-4,
batch 4x32:

================== ======== ======== ========
scheme             depth 6  depth 24 depth 96
================== ======== ======== ========
Post-LN            0.021    0.236    0.393
Pre-LN             0.017    0.036    0.103
DeepNorm           0.003    0.009    0.031
Sub-LN, plain init 0.020    0.077    0.144
Magneto            0.019    0.041    0.093
================== ======== ======== ========

The assertions below are that ordering with margins of 2x or more (measured margins in comments),
except Magneto's init against the plain one (1.3x; measured 1.9x and 1.6x).
"""

import json
import math

import pytest
import torch

from magneto.examples import data, stability
from magneto.examples.stability import DivergenceDetector

DEPTHS = (6, 24, 96)
SEEDS = (0, 1, 2)
UPDATE_LR = 1e-4


@pytest.fixture(autouse=True)
def _restore_threads():
    """The script sets torch's thread count; give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------- data


def _fake_stdlib(root):
    """A small tree with distinct file contents, plus directories the corpus must skip."""
    contents = {}
    for i in range(40):
        rel = f"pkg{i % 3}/mod_{i}.py" if i % 2 else f"mod_{i}.py"
        contents[rel] = f"# file {i}\n" + "x = %d\n" % (i * 7919) * (i % 5 + 1)
    for rel in ("site-packages/third.py", "test/test_x.py", "pkg0/tests/test_y.py", "notes.txt"):
        contents[rel] = "SKIPPED\n"
    for rel, text in contents.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return contents


def _decode(stream):
    """Split a token stream back into file texts at EOF tokens."""
    docs, current = [], []
    for t in stream.tolist():
        if t == data.EOF_TOKEN:
            docs.append(bytes(current).decode())
            current = []
        else:
            current.append(t)
    return docs


def test_split_is_by_file_and_excludes_non_library_files(tmp_path):
    contents = _fake_stdlib(tmp_path)
    listed = data.list_source_files(tmp_path)
    assert all(
        not rel.startswith(("site-packages/", "test/")) and "/tests/" not in rel for rel in listed
    )
    assert len(listed) == 40 and listed == sorted(listed)

    corpus = data.load_corpus(
        train_bytes=10**6, valid_bytes=10**6, valid_fraction=0.25, root=tmp_path
    )
    assert set(corpus.train_files).isdisjoint(corpus.valid_files)
    assert set(corpus.train_files) | set(corpus.valid_files) == set(listed)
    assert all(data.is_validation(f, 0.25) for f in corpus.valid_files)
    assert not any(data.is_validation(f, 0.25) for f in corpus.train_files)
    assert 0 < len(corpus.valid_files) < len(corpus.train_files)
    # Every byte of a file lands in its own split, whole and in the recorded order.
    assert _decode(corpus.train) == [contents[f] for f in corpus.train_files]
    assert _decode(corpus.valid) == [contents[f] for f in corpus.valid_files]
    # The order is the hash order, not the listing order.
    assert list(corpus.train_files) == sorted(corpus.train_files, key=data.file_key)


def test_byte_budget_cuts_the_stream(tmp_path):
    _fake_stdlib(tmp_path)
    corpus = data.load_corpus(train_bytes=100, valid_bytes=30, valid_fraction=0.25, root=tmp_path)
    assert corpus.train.numel() == 100 and corpus.valid.numel() == 30
    assert corpus.train.dtype == torch.int64 and int(corpus.train.max()) < data.VOCAB_SIZE
    with pytest.raises(ValueError, match="valid_fraction"):
        data.load_corpus(valid_fraction=1.5, root=tmp_path)
    with pytest.raises(ValueError, match="root"):
        data.list_source_files(tmp_path / "missing")


def test_stdlib_corpus_is_deterministic():
    a = data.load_corpus(train_bytes=50_000, valid_bytes=20_000)
    b = data.load_corpus(train_bytes=50_000, valid_bytes=20_000)
    assert torch.equal(a.train, b.train) and torch.equal(a.valid, b.valid)
    assert a.train_files == b.train_files and a.valid_files == b.valid_files
    assert set(a.train_files).isdisjoint(a.valid_files)
    # About the requested fraction of the whole library is held out (by file).
    files = data.list_source_files()
    held_out = sum(data.is_validation(f, 0.1) for f in files) / len(files)
    assert 0.05 < held_out < 0.15, held_out


def test_windows_are_shifted_targets():
    stream = torch.arange(1000) % data.VOCAB_SIZE
    inputs, targets = data.random_windows(stream, 5, 16, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (5, 16)
    assert torch.equal(targets[:, :-1], inputs[:, 1:]) and torch.equal((inputs + 1) % 257, targets)
    again = data.random_windows(stream, 5, 16, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs)
    fixed, fixed_targets = data.fixed_windows(stream, 7, 16)
    assert fixed.shape == (7, 16) and fixed[0, 0] == 0 and fixed_targets[-1, -1] == 999 % 257
    with pytest.raises(ValueError, match="shorter"):
        data.random_windows(stream[:10], 1, 16, torch.Generator())


# ------------------------------------------------------------------------ divergence detection


def test_detector_accepts_a_normal_run_with_a_spike():
    detector = DivergenceDetector(initial_loss=5.6, window=10, patience=30)
    losses = [5.5 * 0.97**i for i in range(80)]
    losses[30] = 9.0  # one spike, recovered from at once
    losses[50:55] = [20.0] * 5  # five bad steps lift the 10-step mean above 5.6 for a while
    assert all(detector.update(loss, 1.0) is None for loss in losses)
    assert detector.diverged_at is None and detector.above_since is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_detector_stops_on_non_finite_values(bad):
    detector = DivergenceDetector(5.6)
    assert detector.update(3.0, 1.0) is None
    assert "loss" in detector.update(bad, 1.0) and detector.diverged_at == 2
    detector = DivergenceDetector(5.6)
    assert "gradient" in detector.update(3.0, bad) and detector.diverged_at == 1


def test_detector_stops_when_the_loss_stays_above_the_initial_loss():
    detector = DivergenceDetector(initial_loss=5.6, window=10, patience=30)
    for i in range(30):
        assert detector.update(5.5 - 0.1 * i) is None  # down to 2.6
    verdicts = [detector.update(7.0) for _ in range(60)]
    # The 10-step mean first exceeds 5.6 at step 30 + 7 (2.8, 2.7, 2.6 and seven 7.0s); the
    # run is stopped on the 30th step above, step 66 (verdict 35), and diverged at step 37.
    first = next(i for i, v in enumerate(verdicts) if v is not None)
    assert first == 35 and "above the initial 5.600" in verdicts[first]
    assert detector.diverged_at == detector.above_since == 37
    with pytest.raises(ValueError, match="patience"):
        DivergenceDetector(5.6, patience=0)
    with pytest.raises(ValueError, match="initial_loss"):
        DivergenceDetector(math.nan)


def test_detector_does_not_judge_before_a_full_window():
    detector = DivergenceDetector(initial_loss=5.6, window=10, patience=1)
    assert all(detector.update(6.0) is None for _ in range(9))  # above, but only 9 steps
    assert detector.update(6.0) is not None and detector.diverged_at == 10


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    f = stability.lr_factor
    assert [f(s, 0, 100) for s in (0, 100)] == pytest.approx([1.0, 0.1])
    assert f(1, 0, 100) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 100)))
    assert [f(s, 10, 110) for s in (1, 5, 10)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(110, 10, 110) == pytest.approx(0.1) and f(60, 10, 110) == pytest.approx(0.55)
    factors = [f(s, 10, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


# ------------------------------------------------------------------------- models and one run


def test_plain_init_ablation_is_magneto_divided_by_its_gain():
    """``subln_plain`` is Magneto's model with the gained weights (v_proj, out_proj, fc1, fc2)
    divided by Magneto's gain sqrt(log(2L)), every other parameter equal: Sub-LN, gain 1."""
    layers, width = 6, 16
    shape = dict(layers=layers, width=width, heads=2, ffn_dim=32, max_positions=16)
    models = {}
    for scheme in ("subln", "subln_plain", "pre"):
        torch.manual_seed(3)
        models[scheme] = stability.build_model(scheme, **shape).state_dict()
    gamma = math.sqrt(math.log(2 * layers))
    magneto_, plain = models["subln"], models["subln_plain"]
    assert magneto_.keys() == plain.keys()
    gained = 0
    for name, value in magneto_.items():
        if name.endswith("in_proj.weight"):  # rows q, k, v: only v has the gain
            torch.testing.assert_close(plain[name][: 2 * width], value[: 2 * width])
            torch.testing.assert_close(plain[name][2 * width :] * gamma, value[2 * width :])
            gained += 1
        elif name.endswith(("out_proj.weight", "fc1.weight", "fc2.weight")):
            torch.testing.assert_close(plain[name] * gamma, value)
            gained += 1
        else:
            assert torch.equal(plain[name], value), name
        if name in models["pre"]:
            assert torch.equal(plain[name], models["pre"][name]), name
    assert gained == 4 * layers and gamma > 1.5
    with pytest.raises(ValueError, match="scheme"):
        stability.build_model("sub-ln", **shape)


def _tiny_setup(**changes):
    return stability.Setup(
        **{
            **dict(
                width=16,
                heads=2,
                ffn_dim=32,
                seq_len=16,
                batch_size=4,
                steps=40,
                valid_windows=4,
                train_bytes=20_000,
                valid_bytes=4_000,
                window=5,
                patience=5,
            ),
            **changes,
        }
    )


@pytest.fixture(scope="module")
def tiny_data():
    return stability.Data.load(_tiny_setup())


def test_a_run_learns_and_records_everything(tiny_data):
    setup = _tiny_setup()
    result = stability.train_run(stability.Run("subln", 2, 3e-3, 5, 0), setup, tiny_data)
    assert not result["diverged"] and result["diverged_step"] is None and not result["reason"]
    assert result["steps_done"] == 40 and len(result["train_curve"]) == 20  # every 2 steps
    assert result["final_loss"] < result["initial_loss"] - 0.5  # it learns (measured: 1.08)
    assert result["initial_loss"] > math.log(data.VOCAB_SIZE)  # a random model, not a trained one
    assert result["max_grad_norm"] > 0 and 0 < result["first_update"] < 1
    assert result["cpu_seconds"] > 0 and result["parameters"] > 0
    again = stability.train_run(stability.Run("subln", 2, 3e-3, 5, 0), setup, tiny_data)
    assert again["final_loss"] == result["final_loss"]  # the seed fixes init and batches


def test_a_run_at_an_absurd_rate_is_stopped_early(tiny_data):
    setup = _tiny_setup()
    result = stability.train_run(stability.Run("post", 4, 30.0, 0, 0), setup, tiny_data)
    assert result["diverged"] and result["reason"]
    assert result["steps_done"] < setup.steps and 1 <= result["diverged_step"] <= 10
    json.dumps(result, allow_nan=False)  # the store's lines are strict JSON


def test_unigram_baseline_is_the_frequency_cross_entropy():
    train = torch.tensor([0, 0, 0, 1])  # add-one smoothed: p(0) = 4/261, p(1) = 2/261
    assert stability.unigram_loss(train, torch.tensor([0, 1])) == pytest.approx(
        -(math.log(4 / 261) + math.log(2 / 261)) / 2, rel=1e-12
    )


# ----------------------------------------------------------------------------- update size


@pytest.fixture(scope="module")
def update_sizes():
    """Mean over SEEDS of the relative output change after one Adam step, per (scheme, depth)."""
    torch.set_num_threads(1)
    sizes = stability.update_sizes(stability.SCHEMES, DEPTHS, lr=UPDATE_LR, seeds=SEEDS)
    print("\nrelative output change after one Adam step at init (mean of seeds", SEEDS, ")")
    for scheme in stability.SCHEMES:
        print(
            f"{stability.LABELS[scheme]:>17}: "
            + "  ".join(f"{sizes[scheme, d]:.4f}" for d in DEPTHS)
        )
    return sizes


def test_measure_update_prints_a_table(capsys):
    stability.main(["--measure-update", "--schemes", "deepnorm", "--threads", "1"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| DeepNorm |")]
    assert len(row) == 1
    measured = [float(cell) for cell in row[0].strip("| ").split("|")[1:]]
    recorded = [0.0028, 0.0086, 0.0310]  # the module docstring's table
    assert measured == pytest.approx(recorded, rel=0.05)


def test_update_size_is_deterministic():
    first = stability.relative_update("post", 6, lr=UPDATE_LR, seed=0)
    assert first == stability.relative_update("post", 6, lr=UPDATE_LR, seed=0)
    assert math.isfinite(first) and first > 0


def test_post_ln_update_grows_with_depth_much_faster(update_sizes):
    s = update_sizes
    growth = {scheme: s[scheme, 24] / s[scheme, 6] for scheme in stability.SCHEMES}
    # Measured growth 6 -> 24 layers: Post-LN 11.4x, Magneto 2.2x, DeepNorm 3.1x, Pre-LN 2.2x.
    assert growth["post"] > 2.5 * growth["subln"]
    assert growth["post"] > 2.5 * growth["deepnorm"]
    assert growth["post"] > 2.5 * growth["pre"]
    # Absolute increase 6 -> 96 layers: Post-LN 0.37, Magneto 0.075, DeepNorm 0.028.
    increase = {scheme: s[scheme, 96] - s[scheme, 6] for scheme in stability.SCHEMES}
    assert increase["post"] > 3 * increase["subln"] and increase["post"] > 3 * increase["deepnorm"]


def test_post_ln_update_is_largest_when_deep(update_sizes):
    s = update_sizes
    for depth in (
        24,
        96,
    ):  # measured: 5.7x and 4.2x Magneto's, 27x and 13x DeepNorm's, 6.6x and 3.8x Pre-LN's
        for other in ("pre", "deepnorm", "subln"):
            assert s["post", depth] > 2 * s[other, depth], (depth, other)


def test_deepnorm_update_is_smallest_and_magneto_stays_moderate(update_sizes):
    s = update_sizes
    for depth in DEPTHS:  # DeepNorm measured 6.8x, 4.8x, 3.0x below Magneto
        assert s["deepnorm", depth] < s["subln", depth] / 2
    # Magneto's update grows roughly like sqrt(depth): 0.019 -> 0.093 over 16x the depth.
    assert s["subln", 96] / s["subln", 6] < 8


def test_magneto_init_shrinks_sub_ln_update_when_deep(update_sizes):
    """The ablation: the same Sub-LN architecture with gain 1 moves its output more per step."""
    s = update_sizes
    for depth in (24, 96):  # measured 1.86x and 1.55x
        assert s["subln_plain", depth] > 1.3 * s["subln", depth], depth
    assert s["subln_plain", 6] == pytest.approx(s["subln", 6], rel=0.2)  # gain 1.6 at depth 6
