"""A mixture-of-experts feed-forward sublayer as torchscale 0.3.0 builds and runs it
(``torchscale/component/xmoe/moe_layer.py``, ``MOELayer``; ``feedforward_network.py``,
``make_experts``), its experts magneto's fused Sub-LN FFNs.

    y, l_aux = moe(x)       x: (..., d) tokens, already through the layer's input norm

1. the gate (``magneto.moe_gate``) routes each token to one or two experts, each expert taking
   at most ``capacity`` tokens;
2. each expert is torchscale's ``FeedForwardNetwork`` (``fc1``, activation, ``ffn_layernorm``
   under Sub-LN, ``fc2``, output dropout), run as two ``ln_linear`` calls on the tokens it was
   given;
3. a token's output is the weighted sum of its experts' outputs (0 for a token no expert took).

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
``l_aux``). ``expert_group`` builds torchscale's groups; when experts are replicated (more
ranks than experts), summing their gradients over the replicas is the trainer's job, as in
fairseq.
``build_experts`` draws the experts' initial parameters as ``make_experts`` does.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.nn.functional import all_to_all_single

import magneto_kernels
from magneto.moe_gate import Gate, Routing


class Expert(nn.Module):
    """torchscale's ``FeedForwardNetwork`` and its parameter names: ``fc1`` (d -> ffn_dim),
    ``ffn_layernorm`` (Sub-LN only), ``fc2`` (-> d); ``nn.Linear``/``nn.LayerNorm`` used as
    parameter holders, drawn as torchscale draws them.

    ``activation``: torchscale's ``activation_fn`` ("gelu", "relu", "swish") or any activation
    of ``magneto_kernels``. No input norm: the MoE layer's tokens are normalised already.
    """

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        activation: str = "gelu",
        dropout: float = 0.0,
        activation_dropout: float = 0.0,
        eps: float = 1e-5,
        subln: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.activation, self.backend = activation, backend
        self.dropout, self.activation_dropout = dropout, activation_dropout
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=eps) if subln else None

    def forward(self, x: Tensor, dropout_p: Optional[float] = None) -> Tensor:
        """``dropout(fc2(ffn_layernorm(act(fc1(x)))))``: fc1 writes the pre-activation, fc2
        applies the activation and the norm on load (activation dropout in training: unfused).
        ``dropout_p`` overrides the output dropout (``dropout`` in training)."""
        if dropout_p is None:
            dropout_p = self.dropout if self.training else 0.0
        preact = magneto_kernels.ln_linear(
            x, None, None, self.fc1.weight, self.fc1.bias, backend=self.backend
        )
        norm = self.ffn_layernorm
        fc2 = dict(
            ln_weight=None if norm is None else norm.weight,
            ln_bias=None if norm is None else norm.bias,
            eps=1e-5 if norm is None else norm.eps,
            weight=self.fc2.weight,
            bias=self.fc2.bias,
            dropout_p=dropout_p,
            backend=self.backend,
        )
        if self.training and self.activation_dropout > 0.0:
            a = magneto_kernels.activation(preact, self.activation)
            return magneto_kernels.ln_linear(
                magneto_kernels.dropout(a, self.activation_dropout), **fc2
            )
        return magneto_kernels.ln_linear(preact, input_activation=self.activation, **fc2)


def build_experts(build: Callable[[], nn.Module], indices: Iterable[int]) -> nn.ModuleList:
    """The experts of global indices ``indices``, each built by ``build()`` under the seed
    torchscale's ``make_experts`` gives it: one ``torch.randint(1000000)`` draw from torch's
    generator (the only draw left on it), plus the expert's global index (torchscale:
    ``ddp_rank·local count + i``, or the rank's expert group when experts are fewer than
    ranks: the global index when ``ddp_rank`` is the rank)."""
    start_seed = torch.randint(1000000, (1,)).item()
    experts = []
    for index in indices:
        with torch.random.fork_rng():
            torch.manual_seed(start_seed + index)
            experts.append(build())
    return nn.ModuleList(experts)


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
    here. ``experts`` are this rank's, the gate's experts ``rank·len(experts)`` onwards.
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
        - ``input_norm``: the layer's norm, called once; the gate and the experts read its output
          (torchscale: ``final_layer_norm`` before ``moe_layer``).
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
        h = x if input_norm is None else input_norm(x)
        tokens = h.reshape(-1, h.shape[-1])
        mask = None if input_padding_mask is None else input_padding_mask.reshape(-1)
        count = tokens.shape[0]
        if self.group is not None and dist.get_world_size() > 1:
            tokens, mask = _pad_to_world_max(tokens, mask)
        if residual is None:
            base = tokens.new_zeros(tokens.shape)
        else:  # the residual add folded into the combine (zero rows for any padding)
            base = alpha * residual.reshape(-1, residual.shape[-1])
            base = F.pad(base, (0, 0, 0, tokens.shape[0] - count))
        routing = self.gate(tokens, mask)
        exchange = self.group is not None and dist.get_world_size(self.group) > 1
        combine = self._exchange if exchange else self._local
        expert_kwargs = {} if dropout_p is None else {"dropout_p": dropout_p}
        y = combine(tokens, routing, base, expert_kwargs)[:count].reshape(h.shape)
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


def _pad_to_world_max(tokens: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Tokens padded with zero rows to the largest count over the world, and the padding mask
    (True at the padding, and where ``mask`` says), as torchscale's ``MOELayer`` pads them."""
    count = torch.tensor([tokens.shape[0]], device=tokens.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    padded = int(count.item())
    full_mask = torch.ones(padded, dtype=torch.bool, device=tokens.device)
    full_mask[: tokens.shape[0]] = False if mask is None else mask
    if padded == tokens.shape[0]:
        return tokens, full_mask
    pad = tokens.new_zeros(padded - tokens.shape[0], tokens.shape[1])
    return torch.cat([tokens, pad]), full_mask
