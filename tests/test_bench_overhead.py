"""bench/bench_overhead.py calls the raw ops with every argument of their schemas in order: a
schema that grows must not leave the benchmark calling them with the old list (it did, and
failed with "takes 18 arguments, got 15" before timing anything)."""

import torch

from bench import bench_overhead


def test_every_variant_runs_and_agrees_with_eager():
    """Each variant of each op once, at a small size, with and without gradients; the raw and
    public ln_linear give eager's output."""
    for grad in (False, True):
        for op, variants in bench_overhead.cases(2, 64, 48, grad).items():
            with torch.set_grad_enabled(grad):
                outs = {name: fn() for name, fn in variants.items()}
            if op == "ln_linear":
                eager = outs["eager"].reshape(2, 48)
                for name in ("raw", "ops"):
                    torch.testing.assert_close(outs[name][0], eager, msg=f"{name} {grad}")
                torch.testing.assert_close(outs["public"].reshape(2, 48), eager)
