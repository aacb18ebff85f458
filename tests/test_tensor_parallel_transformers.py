"""The Hugging Face tensor-parallel plan (``magneto.parallel.hf``) on gloo, 2 and 4 processes:
Llama, BitNet (dense) and Kosmos-2's text model, patched by ``apply_magneto`` and sharded, give
the unpatched one-process model's logits and every parameter's gradient (fp32), with the
projections fused as in one process (the same count of fused calls). The ranks are started once
per world size for the module."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import transformers_models as tm
from gloo import run_worlds
from harness import require_backend

FAMILIES = ("llama", "bitnet", "kosmos2")
SHARDED_PER_LAYER = {"llama": 7, "bitnet": 9, "kosmos2": 14}
"""Parameters sliced per layer: q/k/v, o_proj and gate/up/down weights; BitNet's two sub-norm
weights too; Kosmos-2's q/k/v and fc1 biases and its two LayerNorms' weights and biases too."""
WORLDS = (2, 4)


def _overrides(family, world):
    # grouped-query attention (2 key/value heads) at 2 ranks; 4 ranks need 4 key/value heads
    return {"num_key_value_heads": 4} if world == 4 and family != "kosmos2" else {}


def _run(model):
    logits = model(tm.ids()).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits * weights).sum().backward()
    return logits


def _llama_tp_plan(world, out_dir):
    """Llama loaded with transformers' own tensor-parallel plan (``tp_plan="auto"``: DTensor
    parameters behind hooks), then ``apply_magneto``: the projections run as transformers'
    modules, the rest fused."""
    import transformers

    path = os.path.join(out_dir, f"llama-{world}")
    if dist.get_rank() == 0:
        tm.pair("llama", **_overrides("llama", world))[1].save_pretrained(path)
    dist.barrier()
    model = tm.mt.apply_magneto(transformers.LlamaForCausalLM.from_pretrained(path, tp_plan="auto"))
    logits = _run(model)
    grads = {
        n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return {"logits": logits.detach(), "grads": grads, "shards": dict.fromkeys(grads)}


def _count_row_parallel_calls(patch, calls):
    """calls also counts the row-parallel projections behind a sharded sub-norm: they run the
    family's sharded-norm entry points (fused), not ``magneto_kernels.ln_linear``."""
    import magneto.parallel.layers as layers

    original = layers.row_parallel_norm_linear

    def counting(*args, **kwargs):
        calls.count += 1
        return original(*args, **kwargs)

    patch.setattr(layers, "row_parallel_norm_linear", counting)


def _rank(rank, world, out_dir):
    from magneto.parallel import shard_of, tensor_parallelize_transformers

    results = {"llama_tp_plan": _llama_tp_plan(world, out_dir)}
    for family in FAMILIES:
        model, _ = tm.pair(family, **_overrides(family, world))
        tensor_parallelize_transformers(model, dist.group.WORLD)
        with pytest.MonkeyPatch.context() as patch:
            calls = tm.FusedCalls(patch)
            _count_row_parallel_calls(patch, calls)
            logits = _run(model)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        shards = {n: shard_of(model, n) for n in grads}
        results[family] = {
            "logits": logits.detach(),
            "grads": grads,
            "shards": shards,
            "fused_calls": calls.count,
        }
    return results


@pytest.fixture(scope="module")
def _runs():
    require_backend("cpu")
    with tempfile.TemporaryDirectory() as out_dir:
        return run_worlds(_rank, WORLDS, out_dir)


@pytest.mark.parametrize("world", WORLDS)
def test_llama_with_transformers_tp_plan_and_apply_magneto(_runs, world):
    _, reference = tm.pair("llama", **_overrides("llama", world))
    logits = _run(reference)
    for rank, results in enumerate(r["llama_tp_plan"] for r in _runs[world]):
        tm.close(results["logits"], logits, what=f"rank {rank} logits")
        for name, p in reference.named_parameters():
            tm.close(results["grads"][name], p.grad, what=f"rank {rank} grad of {name}")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_model_matches_one_process(_runs, world, family):
    _, reference = tm.pair(family, **_overrides(family, world))
    logits = _run(reference)
    want = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    for rank, results in enumerate(r[family] for r in _runs[world]):
        assert results["fused_calls"] == tm.LAYERS * tm.FUSED_PER_LAYER[family] + tm.HEAD
        tm.close(results["logits"], logits, what=f"rank {rank} logits")
        assert set(results["grads"]) == set(want)
        sharded = [n for n, shard in results["shards"].items() if shard is not None]
        assert len(sharded) == SHARDED_PER_LAYER[family] * tm.LAYERS, sharded
        for name, grad in want.items():
            shard = results["shards"][name]
            grad = grad if shard is None else grad.index_select(*shard)
            tm.close(results["grads"][name], grad, what=f"rank {rank} grad of {name}")


def test_projections_of_other_classes_are_refused():
    """A projection that is neither an nn.Linear nor one of BitNet's quantised classes (which
    shard: tests/test_tensor_parallel_quant.py) is refused, not turned into a dense shard."""
    from gloo import one_process_group

    from magneto.parallel import tensor_parallelize_transformers

    class LinearSubclass(torch.nn.Linear):
        pass

    model, _ = tm.pair("bitnet")
    attention = model.model.layers[0].self_attn
    linear = attention.q_proj
    attention.q_proj = LinearSubclass(linear.in_features, linear.out_features, bias=False)
    with one_process_group(), pytest.raises(ValueError, match="q_proj is a LinearSubclass"):
        tensor_parallelize_transformers(model, dist.group.WORLD)
