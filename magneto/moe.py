"""A mixture-of-experts feed-forward sublayer as torchscale 0.3.0 builds and runs it
(``torchscale/component/xmoe/moe_layer.py``, ``MOELayer``; ``feedforward_network.py``,
``make_experts``), its experts magneto's fused Sub-LN FFNs.

    y, l_aux = moe(x, input_norm=norm, residual=x, alpha=alpha)      x: (..., d) tokens

1. the gate (``magneto.moe_gate``) routes each token, normalised by the layer's norm, to one or
   two experts, each expert taking at most ``capacity`` tokens;
2. each expert is a ``magneto.FeedForward`` (torchscale's ``FeedForwardNetwork``: ``fc1``,
   activation, ``ffn_layernorm`` under Sub-LN, ``fc2``, output dropout), run as two
   ``ln_linear`` calls on the tokens it was given, the layer's norm fused into fc1;
3. a token's output is the residual plus the weighted sum of its experts' outputs (the
   residual alone for a token no expert took).

The layer's norm is never applied on its own: the gate's projection (``wg``, or X-MoE's
``wg_reduction``) and every expert's fc1 take it fused, as ``ln_linear``'s prologue, on the
tokens they read, so no normalised copy of the tokens is kept for backward.

torchscale multiplies dense (E·C, S) dispatch and (S, E·C) combine matrices into the tokens
(O(S²·d) work for top-2, C ≈ 2S/E); here the tokens are gathered into each expert's rows and the
weighted outputs added back at their tokens, O(S·d), with the same values.

**Expert parallelism** (``group`` with several ranks, torchscale's all-to-all): every rank of the
group holds ``len(experts)`` consecutive experts of the E = ranks·len(experts) (rank r: experts
r·len(experts) ...). Each rank fills a (E, capacity, d) buffer, exchanges it so that each rank
gets its experts' rows from every rank, runs its experts, and exchanges the outputs back;
gradients flow back through the same exchanges. With a ``group`` in a world of several ranks,
every rank first pads its tokens to the largest token count over the world, as torchscale's
layer does, so that capacities agree (padding tokens go nowhere but count in the capacity and
``l_aux``; torchscale pads after the norm with zero rows, whose routing scores are 0, so the
gate scores the real tokens only and gives the padding zero scores). ``expert_group`` builds
torchscale's groups; when experts are replicated (more ranks than experts), summing their
gradients over the replicas is the trainer's job, as in fairseq. The layer's norm, fused into
the experts' fc1, meets other ranks' tokens on the ranks running their experts: its gradient
from a rank's tokens partly lands on those ranks, and only the sum over the ranks (what
data-parallel training all-reduces for every non-expert parameter) is torchscale's.

``build_experts`` draws the experts' initial parameters as ``make_experts`` does;
``build_moe_layer`` builds a model's MoE layer from its ``MagnetoConfig`` as torchscale's layers
build theirs.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_to_all_single

from magneto.config import MagnetoConfig
from magneto.feedforward import FeedForward
from magneto.moe_gate import Gate, Routing


def _seeded(indices: Iterable[int], run: Callable[[int], object]) -> list:
    """``run(index)`` for each global expert index under the seed torchscale's ``make_experts``
    gives that expert: one ``torch.randint(1000000)`` draw from torch's generator (the only
    draw left on it), plus the index (torchscale: ``ddp_rank·local count + i``, or the rank's
    expert group when experts are fewer than ranks: the global index when ``ddp_rank`` is the
    rank)."""
    start_seed = torch.randint(1000000, (1,)).item()
    results = []
    for index in indices:
        with torch.random.fork_rng():
            torch.manual_seed(start_seed + index)
            results.append(run(index))
    return results


def build_experts(build: Callable[[], nn.Module], indices: Iterable[int]) -> nn.ModuleList:
    """The experts of global indices ``indices``, each built by ``build()`` under its
    ``make_experts`` seed."""
    return nn.ModuleList(_seeded(indices, lambda index: build()))


def build_moe_layer(config: MagnetoConfig, gain: float = 1.0) -> "MoELayer":
    """The MoE layer of a model with ``config`` (``moe_*`` fields, ``use_xmoe``), as torchscale's
    encoder and decoder layers build it: the gate, then this rank's experts (``FeedForward``s
    with init gain ``gain``) in torchscale's placement over ``torch.distributed``'s ranks."""
    gate = Gate(
        config.embed_dim,
        config.moe_expert_count,
        1 if config.moe_top1_expert else 2,
        use_fp32=config.moe_gating_use_fp32,
        second_expert_policy=config.moe_second_expert_policy,
        normalize_gate_prob_before_dropping=config.moe_normalize_gate_prob_before_dropping,
        eval_capacity_token_fraction=config.moe_eval_capacity_token_fraction,
        use_xmoe=config.use_xmoe,
        backend=config.backend,
    )
    group, indices = expert_group(config.moe_expert_count)
    experts = build_experts(lambda: FeedForward(config, gain=gain), indices)
    return MoELayer(gate, experts, group)


def expert_group(num_experts: int) -> tuple[Optional[dist.ProcessGroup], range]:
    """torchscale's all-to-all group for ``num_experts`` experts and the global indices of this
    rank's experts; ``(None, range(num_experts))`` outside ``torch.distributed``. With E ≥ W
    ranks (E divisible by W) the group is the world and rank r holds E/W experts; with W > E
    (W divisible by E) ranks ``i·E … i·E + E − 1`` form group i, rank r holds expert r mod E.
    Every rank must call it (it creates groups when W > E)."""
    if not dist.is_initialized():
        return None, range(num_experts)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world <= num_experts:
        if num_experts % world:
            raise ValueError(f"num_experts={num_experts} is not a multiple of the {world} ranks")
        local = num_experts // world
        return dist.group.WORLD, range(rank * local, (rank + 1) * local)
    if world % num_experts:
        raise ValueError(f"the {world} ranks are not a multiple of num_experts={num_experts}")
    groups = [
        dist.new_group([i * num_experts + j for j in range(num_experts)])
        for i in range(world // num_experts)
    ]
    return groups[rank // num_experts], range(rank % num_experts, rank % num_experts + 1)


class MoELayer(nn.Module):
    """torchscale's ``MOELayer(gate, experts)``: parameters ``gate.*`` and ``experts.<i>.*``
    (``i`` the local index), ``forward(x, input_padding_mask)`` -> ``(y, l_aux)``.

    ``group``: the expert-parallel process group (``expert_group``); None runs every expert
    here. ``experts`` are this rank's, the gate's experts ``rank·len(experts)`` onwards (rank
    in ``group``). An expert is called as ``expert(rows, input_norm=..., dropout_p=...)``
    (``FeedForward``'s sublayer protocol).
    """

    def __init__(
        self,
        gate: Gate,
        experts: Iterable[nn.Module],
        group: Optional[dist.ProcessGroup] = None,
    ):
        super().__init__()
        self.gate = gate
        self.experts = experts if isinstance(experts, nn.ModuleList) else nn.ModuleList(experts)
        self.group = group
        ranks = 1 if group is None else dist.get_world_size(group)
        if len(self.experts) * ranks != gate.num_experts:
            raise ValueError(
                f"{len(self.experts)} experts on each of {ranks} rank(s) != the gate's "
                f"num_experts={gate.num_experts}"
            )
        for p in self.experts.parameters():
            p.expert = True  # fairseq's trainer keeps these out of the data-parallel all-reduce

    def reset_parameters(self, *args) -> None:
        """Redraw the gate, then the experts under their ``make_experts`` seeds (``args``, e.g.
        an init gain, go to each expert)."""
        self.gate.reset_parameters()
        start = (0 if self.group is None else dist.get_rank(self.group)) * len(self.experts)
        indices = range(start, start + len(self.experts))
        _seeded(indices, lambda index: self.experts[index - start].reset_parameters(*args))

    def forward(
        self,
        x: Tensor,
        input_padding_mask: Optional[Tensor] = None,
        *,
        input_norm: Optional[nn.Module] = None,
        residual: Optional[Tensor] = None,
        alpha: float = 1.0,
        dropout_p: Optional[float] = None,
        time_major: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """``(y, l_aux)`` with ``y = alpha·residual + Σ weight·expert(input_norm(x))`` of x's
        shape (no residual term without ``residual``).

        - ``input_padding_mask`` (x's leading shape, True at padding): those tokens go nowhere.
        - ``input_norm``: the layer's norm (torchscale: ``final_layer_norm`` before
          ``moe_layer``), fused into the gate's projection and each expert's fc1.
        - ``dropout_p``: the experts' output dropout instead of their own (``residual``'s
          sublayer protocol, as ``magneto.FeedForward``).
        - ``time_major``: route a (batch, length, d) ``x`` in (length, batch) order, the order
          in which torchscale's encoder hands its tokens over (capacity goes to tokens first in
          that order); its decoder hands them batch-major.
        """
        if input_padding_mask is not None and input_padding_mask.shape != x.shape[:-1]:
            raise ValueError(
                f"input_padding_mask must have shape {tuple(x.shape[:-1])}, got "
                f"{tuple(input_padding_mask.shape)}"
            )
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {residual.shape}")
        if time_major:
            if x.dim() != 3:
                raise ValueError(f"time_major: x must be (batch, length, d), got {tuple(x.shape)}")
            x, residual, input_padding_mask = (
                None if t is None else t.transpose(0, 1) for t in (x, residual, input_padding_mask)
            )
        tokens = x.reshape(-1, x.shape[-1])
        mask = None if input_padding_mask is None else input_padding_mask.reshape(-1)
        count = padded = tokens.shape[0]
        if self.group is not None and dist.get_world_size() > 1:
            padded, mask = _pad_to_world_max(count, mask, tokens.device)
        if residual is None:
            base = tokens.new_zeros(tokens.shape)
        else:  # the residual add folded into the combine
            base = residual.reshape(-1, residual.shape[-1])
            base = base if alpha == 1.0 else alpha * base
        routing = self.gate(tokens, mask, input_norm=input_norm, num_tokens=padded)
        exchange = self.group is not None and dist.get_world_size(self.group) > 1
        combine = self._exchange if exchange else self._local
        expert_kwargs = {"input_norm": input_norm}
        if dropout_p is not None:
            expert_kwargs["dropout_p"] = dropout_p
        y = combine(tokens, routing, base, expert_kwargs).reshape(x.shape)
        return (y.transpose(0, 1) if time_major else y), routing.l_aux

    def _local(self, tokens: Tensor, routing: Routing, base: Tensor, kwargs: dict) -> Tensor:
        """Every expert here, each on the tokens it took (in capacity-buffer order)."""
        position, token, weight = _dispatched(routing)
        order = torch.argsort(position)
        position, token, weight = position[order], token[order], weight[order]
        counts = torch.bincount(position // routing.capacity, minlength=len(self.experts))
        rows = tokens[token].split(counts.tolist())
        out = torch.cat([expert(r, **kwargs) for expert, r in zip(self.experts, rows)])
        return _combine(base, token, weight, out)

    def _exchange(self, tokens: Tensor, routing: Routing, base: Tensor, kwargs: dict) -> Tensor:
        """torchscale's all-to-all: (E·C, d) buffer out, this rank's experts' rows in, back."""
        ranks, capacity = dist.get_world_size(self.group), routing.capacity
        position, token, weight = _dispatched(routing)
        buffer = tokens.new_zeros(self.gate.num_experts * capacity, tokens.shape[1])
        buffer = buffer.index_copy(0, position, tokens[token])
        buffer = all_to_all_single(torch.empty_like(buffer), buffer, group=self.group)
        rows = buffer.view(ranks, len(self.experts), capacity, -1)
        out = torch.stack(
            [
                expert(rows[:, j].reshape(ranks * capacity, -1), **kwargs).view(ranks, capacity, -1)
                for j, expert in enumerate(self.experts)
            ],
            dim=1,
        ).view_as(buffer)
        out = all_to_all_single(torch.empty_like(out), out, group=self.group)
        return _combine(base, token, weight, out[position])


def _dispatched(routing: Routing) -> tuple[Tensor, Tensor, Tensor]:
    """For every dispatched (token, choice): its row in the (E·C) buffer, the token, the weight."""
    kept = routing.kept.flatten()
    top = routing.kept.shape[1]
    position = (routing.expert * routing.capacity + routing.slot).flatten()[kept]
    token = torch.arange(kept.numel(), device=kept.device).div(top, rounding_mode="floor")
    return position, token[kept], routing.weight.flatten()[kept]


def _combine(base: Tensor, token: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    """``base`` plus, at each token, Σ over its dispatched choices of weight·expert output
    (torchscale's combine)."""
    weighted = out * weight.to(out.dtype).unsqueeze(-1)
    return base.index_add(0, token, weighted)


def _pad_to_world_max(count: int, mask: Optional[Tensor], device) -> tuple[int, Tensor]:
    """The largest token count over the world, which torchscale's ``MOELayer`` pads every rank
    to, and the padding mask of that many tokens (True at the padding, and where ``mask``
    says)."""
    largest = torch.tensor([count], device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    padded = int(largest.item())
    full_mask = torch.ones(padded, dtype=torch.bool, device=device)
    full_mask[:count] = False if mask is None else mask
    return padded, full_mask
