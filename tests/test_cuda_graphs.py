"""The decode path captured in CUDA graphs: a plain ``torch.cuda.CUDAGraph`` capture and
``torch.compile(mode="reduce-overhead")`` (which captures one), on each GPU backend.

A decode step's kernels take microseconds, so on a GPU the launch overhead dominates unless the
step is replayed from a graph; that needs the ops to allocate only through the caching
allocator, never synchronise with the host and never read a tensor's value on the host. Each
test replays the graph on new inputs copied into the captured ones and compares with the eager
call. GPU-only (marked ``gpu``): they run in bench/gpu_check.sh.
"""

import pytest
import torch
from harness import RTOL, assert_close, randn, require_backend

import magneto
import magneto_kernels as mk

pytestmark = pytest.mark.gpu

GPU_BACKENDS = [pytest.param(name, id=name) for name in ("cuda", "triton")]
D, HEADS, FFN, CONTEXT = 256, 4, 1024, 64


def _capture(fn, static_inputs):
    """A graph of ``fn(*static_inputs)`` (warmed up on a side stream first, as capture needs)
    and the output tensor it writes on replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static_inputs)
    return graph, out


def _ln_linear_decode(backend):
    """ln_linear at one row, as a decode step's fused qkv projection runs it (no_grad)."""
    w, b = randn(D, mean=1.0, std=0.2, device="cuda"), randn(D, std=0.2, device="cuda")
    weight = randn(3 * D, D, std=D**-0.5, device="cuda")

    @torch.no_grad()
    def fn(x, residual):
        return mk.ln_linear(
            x, w, b, weight, None, activation="gelu", residual=residual, backend=backend
        )

    return fn


def _decoder_step(backend):
    """One token of a 2-layer Sub-LN decoder over a fixed-length cache (no_grad)."""
    torch.manual_seed(0)
    config = magneto.MagnetoConfig(
        embed_dim=D, num_heads=HEADS, ffn_dim=FFN, decoder_layers=2, backend=backend
    )
    model = magneto.Decoder(config).cuda().eval()
    cache = [
        {
            "prev_key": randn(1, HEADS, CONTEXT, D // HEADS, device="cuda"),
            "prev_value": randn(1, HEADS, CONTEXT, D // HEADS, device="cuda"),
        }
        for _ in model.layers
    ]

    @torch.no_grad()
    def fn(x):
        # a fresh state dict per call over the same cached tensors: the cache does not grow
        for layer, kv in zip(model.layers, cache):
            x = layer(x, incremental_state=dict(kv))[0]
        return x

    return fn


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_ln_linear_decode_in_a_cuda_graph(backend):
    require_backend(backend, "cuda")
    fn = _ln_linear_decode(backend)
    x, residual = randn(1, 1, D, mean=1.0, device="cuda"), randn(1, 1, 3 * D, device="cuda")
    graph, out = _capture(fn, (x, residual))
    for seed in range(3):
        new_x = randn(1, 1, D, mean=1.0 + seed, device="cuda")
        new_residual = randn(1, 1, 3 * D, device="cuda")
        x.copy_(new_x)
        residual.copy_(new_residual)
        graph.replay()
        torch.testing.assert_close(out, fn(new_x, new_residual), rtol=0, atol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_decoder_step_in_a_cuda_graph(backend):
    require_backend(backend, "cuda")
    fn = _decoder_step(backend)
    x = randn(1, 1, D, device="cuda")
    graph, out = _capture(fn, (x,))
    new_x = randn(1, 1, D, mean=0.5, device="cuda")
    x.copy_(new_x)
    graph.replay()
    assert_close(out, fn(new_x), RTOL[torch.float32])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_decoder_step_compiled_reduce_overhead(backend):
    """torch.compile's CUDA-graph mode: the ops' fake kernels trace, the graph replays."""
    require_backend(backend, "cuda")
    fn = _decoder_step(backend)
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for seed in range(4):  # the first calls record, the later ones replay the graph
        x = randn(1, 1, D, mean=0.1 * seed, device="cuda")
        assert_close(compiled(x).clone(), fn(x), RTOL[torch.float32])
