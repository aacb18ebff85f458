"""magneto.moe / magneto.moe_gate against torchscale 0.3.0's MOELayer with Top1Gate / Top2Gate,
side by side with the same parameters and tokens: outputs, ``l_aux`` and every gradient within
1e-5 (fp32), top-1 and top-2, training and eval capacity, each second-expert policy (the random
ones drawing the same numbers), normalisation before or after the capacity drop, X-MoE, padding
and non-Sub-LN experts; the initial parameters drawn as torchscale draws them, and state dicts
loading both ways.

torchscale's MOELayer needs torch.distributed (it all-reduces the token count over the world):
a one-process gloo group is started for this module and torn down after it. Its gating's logging
needs ``tests/gloo.py``'s ``float_histc`` on CPU.
"""

import copy

import pytest
import torch
import torch.distributed as dist
from gloo import float_histc, one_process_group
from harness import assert_close, randn
from torchscale.architecture.config import EncoderConfig
from torchscale.component.feedforward_network import make_experts
from torchscale.component.xmoe.moe_layer import MOELayer as TSMOELayer
from torchscale.component.xmoe.routing import Top1Gate, Top2Gate

from magneto import FeedForward, MagnetoConfig
from magneto.moe import MoELayer, build_experts, expert_group
from magneto.moe_gate import Gate, capacity, route

D, FFN, E = 16, 24, 4
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_process_group():
    with one_process_group():
        yield


@pytest.fixture(autouse=True)
def _histc_of_integers(monkeypatch):
    float_histc(monkeypatch)


def _args(**options):
    return EncoderConfig(
        encoder_embed_dim=D,
        encoder_ffn_embed_dim=FFN,
        moe_freq=1,
        moe_expert_count=E,
        **options,
    )


def _expert(activation="gelu", subln=True):
    """An expert as torchscale's ``FeedForwardNetwork`` (init drawn as torchscale draws it)."""
    config = MagnetoConfig(
        embed_dim=D,
        num_heads=1,
        ffn_dim=FFN,
        encoder_layers=1,
        activation=activation,
        norm_scheme="subln" if subln else "pre",
        init="torchscale",
    )
    return FeedForward(config)


def _pair(top, seed=0, **options):
    """torchscale's MoE layer as its EncoderLayer builds it, and ours, from the same seed."""
    args = _args(**options)
    torch.manual_seed(seed)
    if top == 1:
        gate = Top1Gate(
            D,
            E,
            use_fp32=args.moe_gating_use_fp32,
            moe_eval_capacity_token_fraction=args.moe_eval_capacity_token_fraction,
            use_xmoe=args.use_xmoe,
        )
    else:
        gate = Top2Gate(
            D,
            E,
            args.moe_gating_use_fp32,
            args.moe_second_expert_policy,
            args.moe_normalize_gate_prob_before_dropping,
            args.moe_eval_capacity_token_fraction,
            use_xmoe=args.use_xmoe,
        )
    theirs = TSMOELayer(gate, make_experts(args, D, FFN), args)

    torch.manual_seed(seed)
    gate = Gate(
        D,
        E,
        top,
        use_fp32=args.moe_gating_use_fp32,
        second_expert_policy=args.moe_second_expert_policy,
        normalize_gate_prob_before_dropping=args.moe_normalize_gate_prob_before_dropping,
        eval_capacity_token_fraction=args.moe_eval_capacity_token_fraction,
        use_xmoe=args.use_xmoe,
    )
    experts = build_experts(lambda: _expert(args.activation_fn, args.subln), range(E))
    return MoELayer(gate, experts), theirs


@torch.no_grad()
def _perturb(module, seed=1):
    """Norm weights off 1, biases off 0; the gate's scores spread so that experts overflow."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        p.add_((3.0 if "gate" in name else 0.1) * torch.randn(p.shape, generator=g))


CASES = {
    "default": {},  # fp32 gating, second expert kept with probability 2·g2, weights normalised
    "sampling": {"moe_second_expert_policy": "sampling"},  # after the drop
    "all-normalized-first": {
        "moe_second_expert_policy": "all",
        "moe_normalize_gate_prob_before_dropping": True,
    },
    "xmoe": {"use_xmoe": True},
    "pre-ln-relu": {"subln": False, "activation_fn": "relu"},
    "swish-gating-in-x-dtype": {"activation_fn": "swish", "moe_gating_use_fp32": False},
    "eval-train-capacity": {"moe_eval_capacity_token_fraction": 0.0},
}


def _run(layer, x, padding, dy, seed):
    x = x.detach().clone().requires_grad_()
    captured = {}
    if isinstance(layer, MoELayer):
        hook = layer.gate.register_forward_hook(lambda m, i, out: captured.update(routing=out))
    torch.manual_seed(seed)  # the random policies draw from torch's generator
    y, l_aux = layer(x, input_padding_mask=padding)
    if isinstance(layer, MoELayer):
        hook.remove()
    ((y * dy).sum() + 0.5 * l_aux).backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return y, l_aux, x.grad, grads, captured.get("routing")


@pytest.mark.parametrize("top", [1, 2])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "case,padded", [(case, False) for case in CASES] + [("default", True), ("xmoe", True)]
)
def test_layer_matches_torchscale(top, training, case, padded):
    ours, theirs = _pair(top, **CASES[case])
    _perturb(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.train(training), theirs.train(training)
    x = randn(3, 8, D, mean=0.4)
    padding = None
    if padded:
        padding = torch.zeros(3, 8, dtype=torch.bool)
        padding[0, 5:] = padding[2, 7:] = True
    dy = randn(3, 8, D)
    y, l_aux, dx, grads, routing = _run(ours, x, padding, dy, seed=7)
    y_ts, l_aux_ts, dx_ts, grads_ts, _ = _run(theirs, x, padding, dy, seed=7)

    assert y.shape == y_ts.shape and y.dtype == y_ts.dtype
    assert_close(y, y_ts, TOL, name="y")
    assert_close(l_aux, l_aux_ts, TOL, name="l_aux")
    assert_close(dx, dx_ts, TOL, name="dx")
    assert grads.keys() == grads_ts.keys()
    for name, grad in grads_ts.items():
        assert_close(grads[name], grad, TOL, name="grad " + name)
    if case == "xmoe":  # the in-place renormalisation of the expert embeddings, kept
        assert_close(ours.gate.wg, theirs.gate.wg, 1e-7, name="wg after forward")
    # the cases exercise the capacity: some choice was dropped, and no expert took more
    tokens = 24 - (0 if padding is None else int(padding.sum()))
    assert int(routing.kept.sum()) < tokens * top
    per_expert = torch.bincount(routing.expert[routing.kept], minlength=E)
    assert int(per_expert.max()) <= routing.capacity


@pytest.mark.parametrize("time_major", [True, False], ids=["encoder", "decoder"])
def test_residual_block_is_torchscales_moe_half_layer(time_major):
    """``moe(x, input_norm=, residual=, alpha=, time_major=)`` is the second half of
    torchscale's MoE encoder layer (``final_layer_norm``, tokens handed over time-major,
    ``residual·alpha + y``) or decoder layer (batch-major): output, l_aux, every gradient."""
    ours, theirs = _pair(2, moe_second_expert_policy="all")
    _perturb(theirs)
    ours.load_state_dict(theirs.state_dict())
    norm = torch.nn.LayerNorm(D)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3), norm.bias.normal_(0.0, 0.3)
    norm_ts, alpha = copy.deepcopy(norm), 1.7
    x = randn(3, 8, D, mean=0.4).requires_grad_()
    x_ts = x.detach().clone().requires_grad_()
    dy = randn(3, 8, D)

    h = norm_ts(x_ts)
    h, l_aux_ts = theirs(h.transpose(0, 1)) if time_major else theirs(h)
    y_ts = x_ts * alpha + (h.transpose(0, 1) if time_major else h)
    ((y_ts * dy).sum() + l_aux_ts).backward()
    y, l_aux = ours(x, input_norm=norm, residual=x, alpha=alpha, time_major=time_major)
    ((y * dy).sum() + l_aux).backward()

    assert_close(y, y_ts, TOL, name="y")
    assert_close(l_aux, l_aux_ts, TOL, name="l_aux")
    assert_close(x.grad, x_ts.grad, TOL, name="dx")
    for (name, p), p_ts in zip(norm.named_parameters(), norm_ts.parameters()):
        assert_close(p.grad, p_ts.grad, TOL, name="norm " + name)
    grads_ts = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, grads_ts[name].grad, TOL, name="grad " + name)
    # the order decides which tokens the full experts drop: the two orders differ here
    other, _ = ours(x, input_norm=norm, residual=x, alpha=alpha, time_major=not time_major)
    assert not torch.allclose(other, y)


def test_initial_parameters_are_torchscales():
    """Same seed, same parameters: the gate's draw, then make_experts' seeds (X-MoE's
    orthogonal expert embeddings included)."""
    for top, options in ((1, {}), (2, {"use_xmoe": True})):
        ours, theirs = _pair(top, seed=3, **options)
        state, state_ts = ours.state_dict(), theirs.state_dict()
        assert state.keys() == state_ts.keys()
        for name, value in state_ts.items():
            assert torch.equal(state[name], value), name
    torch.manual_seed(5)
    after_ours = (_pair(2, seed=5), torch.rand(1))[1]
    torch.manual_seed(5)
    args = _args()
    Top2Gate(D, E)
    make_experts(args, D, FFN)
    assert torch.equal(after_ours, torch.rand(1)), "the generator ends where torchscale's does"


def test_state_dict_loads_into_torchscale():
    ours, theirs = _pair(2)
    _perturb(ours)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for name, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], value), name


@pytest.mark.parametrize(
    "tokens,top,eval_mode,fraction,expected",
    [
        (24, 1, False, 0.25, 6),
        (25, 1, False, 0.25, 7),
        (24, 2, False, 0.25, 12),
        (24, 2, True, 0.25, 6),
        (25, 1, True, 0.1, 3),
        (24, 2, True, 0.0, 12),
    ],
)
def test_capacity_is_torchscales(tokens, top, eval_mode, fraction, expected):
    assert capacity(tokens, E, top, eval_mode, fraction) == expected


def test_compact_routing_is_torchscales_dense_combine():
    """The per-choice (expert, slot, weight) equals torchscale's dense (S, E, C) combine
    weights, entry for entry."""
    from torchscale.component.xmoe.routing import top2gating

    logits = randn(30, E) * 3
    torch.manual_seed(11)
    _, combine, dispatch, _ = top2gating(logits, second_expert_policy="random")
    torch.manual_seed(11)
    routing = route(logits, 2, second_expert_policy="random")
    dense = torch.zeros(30, E, routing.capacity)
    for k in range(2):
        kept = routing.kept[:, k]
        tokens = torch.arange(30)[kept]
        dense[tokens, routing.expert[kept, k], routing.slot[kept, k]] += routing.weight[kept, k]
    assert torch.equal(dense, combine)
    assert torch.equal(dense.bool(), dispatch)


def test_expert_group_outside_distributed_is_all_experts(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert expert_group(4) == (None, range(4))


def test_world_of_one_runs_every_expert_here():
    """In a one-rank world, torchscale's group is the world and this rank holds every expert;
    the layer runs them locally (no exchange) and equals the layer without a group."""
    group, indices = expert_group(E)
    assert indices == range(E) and dist.get_world_size(group) == 1
    ours, _ = _pair(2)
    with_group = MoELayer(ours.gate, ours.experts, group)
    x = randn(2, 5, D)
    torch.manual_seed(0)
    a = ours(x)
    torch.manual_seed(0)
    b = with_group(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: Gate(D, 1, 2), "top-2 gating needs >= 2"),
        (lambda: route(torch.zeros(4, 2), 3), "top must be 1 or 2"),
        (lambda: route(torch.zeros(4, 2), 2, second_expert_policy="x"), "second_expert_policy"),
        (lambda: MoELayer(Gate(D, E), [_expert()]), "1 experts on each of 1 rank"),
        (
            lambda: MoELayer(Gate(D, 2), [_expert()] * 2)(
                torch.ones(2, 3, D), torch.zeros(3, 2, dtype=torch.bool)
            ),
            "input_padding_mask must have shape",
        ),
    ],
)
def test_bad_arguments_are_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()
