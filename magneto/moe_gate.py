"""Top-1 and top-2 gating of a mixture-of-experts layer, exactly as torchscale 0.3.0 computes it
(``torchscale/component/xmoe/routing.py``: ``top1gating``, ``top2gating``, ``Top1Gate``,
``Top2Gate``; GShard's algorithm, arXiv 2006.16668).

Per token (S tokens, E experts), with ``gates = softmax(logits)`` (in float32 when
``use_fp32``):

- the first expert is the argmax of ``gates``; top-2's second is the argmax of the other
  logits, plus Gumbel noise under the ``"sampling"`` policy; under ``"random"`` the second
  expert is kept with probability ``2·g2`` (one ``torch.rand`` per token), under any other
  policy always;
- capacity: each expert takes at most C tokens, the first ones in token order (first choices
  before second choices): ``C = capacity_factor·ceil(S/E)`` (top-1; the factor is 1 in
  torchscale's layers), ``2·ceil(S/E)`` (top-2), or in eval mode ``ceil(fraction·S)`` when
  ``eval_capacity_token_fraction > 0``. A token over capacity is dropped from that expert;
- combine weights: top-1, the gate probability ``g1``; top-2, ``g1`` and ``g2`` divided by their
  sum (clamped at float eps), before the capacity drop
  (``normalize_gate_prob_before_dropping``) or after it (then a dropped choice gives its weight
  to the other);
- ``l_aux = E² · mean_e(mean_s(gates[s, e]) · fraction of tokens whose first choice is e)``;
- padding tokens (``padding_mask`` True) go nowhere but count in S, in the capacity and in
  ``l_aux``'s means.

torchscale returns dense (S, E, C) combine weights and dispatch masks (2·S² numbers for top-2);
``Routing`` holds the same information per token and choice: the expert, the slot in its capacity
buffer, the weight and whether the token is dispatched there. The arithmetic on the (S, E)
one-hot masks is torchscale's, in its order, so the weights, slots and ``l_aux`` are its values
and gradients.

X-MoE (``use_xmoe``, Chi et al. 2022): the gate projects the token to 16 dimensions
(``wg_reduction``) and scores it by cosine similarity with the experts' 16-dimensional
embeddings ``wg``, which every forward renormalises in place to norm 1.5 (torchscale's
side effect, kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magneto.fusion import project

POLICIES = ("sampling", "random", "all")
"""``moe_second_expert_policy`` values: Gumbel-noised second choice, second choice kept with
probability 2·g2, always kept (torchscale treats any value but the first two as the last)."""

XMOE_DIM = 16
"""Width of X-MoE's routing space (torchscale's ``wg_reduction`` output)."""


@dataclass
class Routing:
    """Where each of S tokens goes, per choice k < top (the first expert, then the second):
    ``expert[:, k]`` (int64), ``slot[:, k]`` in that expert's buffer of ``capacity`` rows
    (int64), ``weight[:, k]`` (0 where not dispatched; differentiable) and ``kept[:, k]``
    (bool: dispatched)."""

    l_aux: Tensor
    expert: Tensor
    slot: Tensor
    weight: Tensor
    kept: Tensor
    capacity: int


def capacity(
    num_tokens: int,
    num_experts: int,
    top: int,
    eval_mode: bool,
    eval_capacity_token_fraction: float,
    capacity_factor: float = 1.0,
) -> int:
    """Tokens an expert takes (torchscale's formulas)."""
    if eval_capacity_token_fraction > 0.0 and eval_mode:
        return math.ceil(eval_capacity_token_fraction * num_tokens)
    if top == 1:
        return int(capacity_factor * math.ceil(num_tokens / num_experts))
    return 2 * math.ceil(num_tokens / num_experts)


def _locations(mask: Tensor) -> Tensor:
    """Each token's place in the queue of every expert (cumsum − 1 over tokens)."""
    return torch.cumsum(mask, dim=0) - 1


def route(
    logits: Tensor,
    top: int,
    padding_mask: Optional[Tensor] = None,
    *,
    eval_mode: bool = False,
    use_fp32: bool = True,
    second_expert_policy: str = "random",
    normalize_gate_prob_before_dropping: bool = False,
    eval_capacity_token_fraction: float = 0.25,
    capacity_factor: float = 1.0,
) -> Routing:
    """The routing of (S, E) ``logits`` (torchscale's ``top1gating`` / ``top2gating``)."""
    if top not in (1, 2):
        raise ValueError(f"top must be 1 or 2, got {top}")
    if top == 2 and second_expert_policy not in POLICIES:
        raise ValueError(f"second_expert_policy must be one of {POLICIES}")
    if use_fp32:
        logits = logits.float()
    gates = F.softmax(logits, dim=1)
    num_tokens, num_experts = gates.shape
    cap = capacity(
        num_tokens, num_experts, top, eval_mode, eval_capacity_token_fraction, capacity_factor
    )
    nonpadding = None
    if padding_mask is not None and padding_mask.any():
        nonpadding = (~padding_mask).unsqueeze(-1)

    index1 = torch.argmax(gates, dim=1)
    mask1 = F.one_hot(index1, num_experts)
    indices = [index1]
    if top == 1:
        if nonpadding is not None:
            mask1 = mask1 * nonpadding.to(mask1.dtype)
        gate_probs = [(gates * mask1).sum(dim=1)]
    else:
        noisy = logits
        if second_expert_policy == "sampling":
            noisy = logits + _gumbel(logits.shape, logits.device)
        index2 = torch.argmax(noisy.masked_fill(mask1.bool(), float("-inf")), dim=1)
        mask2 = F.one_hot(index2, num_experts)
        indices.append(index2)
        gate_probs = [(gates * mask1).sum(dim=1), (gates * mask2).sum(dim=1)]
        if normalize_gate_prob_before_dropping:
            gate_probs = _normalized(*gate_probs)
        if second_expert_policy == "random":
            sampled = (2 * gate_probs[1]) > torch.rand_like(gate_probs[1])
            mask2 = mask2 * sampled.unsqueeze(-1)
        if nonpadding is not None:
            mask1 = mask1 * nonpadding.to(mask1.dtype)
            mask2 = mask2 * nonpadding.to(mask1.dtype)
    masks = [mask1] if top == 1 else [mask1, mask2]

    locations = [_locations(mask1)]
    if top == 2:  # second choices queue behind every first choice
        locations.append(_locations(mask2) + mask1.sum(dim=0, keepdim=True))

    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask1.to(gates.dtype), dim=0)
    l_aux = torch.mean(me * ce) * num_experts * num_experts

    masks = [m * torch.lt(loc, cap) for m, loc in zip(masks, locations)]
    if top == 2 and not normalize_gate_prob_before_dropping:
        gate_probs = _normalized(*((gates * m).sum(dim=1) for m in masks))
    kept = torch.stack([m.sum(dim=1) > 0 for m in masks], dim=1)
    slot = torch.stack([(loc * m).sum(dim=1) for loc, m in zip(locations, masks)], dim=1)
    weight = torch.stack(gate_probs, dim=1) * kept.to(gates.dtype)
    return Routing(l_aux, torch.stack(indices, dim=1), slot, weight, kept, cap)


def _normalized(g1: Tensor, g2: Tensor) -> tuple[Tensor, Tensor]:
    denom = torch.clamp(g1 + g2, min=torch.finfo(g1.dtype).eps)
    return g1 / denom, g2 / denom


def _gumbel(shape, device) -> Tensor:
    """Standard Gumbel noise drawn as torchscale draws it (same generator calls)."""
    zero, one = torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)
    return torch.distributions.gumbel.Gumbel(zero, one).rsample(shape)


class Gate(nn.Module):
    """torchscale's ``Top1Gate`` (``top=1``) or ``Top2Gate`` (``top=2``): parameters
    ``wg.weight`` (E, d) or, with ``use_xmoe``, ``wg_reduction.weight`` (16, d) and ``wg``
    (E, 16), drawn as torchscale draws them. ``forward(x, padding_mask)`` routes the (S, d)
    tokens ``x`` (eval-mode capacity when not training). ``backend``: the ``magneto_kernels``
    backend of the projection."""

    def __init__(
        self,
        embed_dim: int,
        num_experts: int,
        top: int = 2,
        *,
        use_fp32: bool = True,
        second_expert_policy: str = "random",
        normalize_gate_prob_before_dropping: bool = False,
        eval_capacity_token_fraction: float = 0.25,
        capacity_factor: float = 1.0,
        use_xmoe: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if num_experts < 1 or (top == 2 and num_experts < 2):
            raise ValueError(f"num_experts={num_experts}: top-{top} gating needs >= {top}")
        self.num_experts, self.top, self.use_xmoe = num_experts, top, use_xmoe
        self.backend = backend
        self.options = dict(
            use_fp32=use_fp32,
            second_expert_policy=second_expert_policy,
            normalize_gate_prob_before_dropping=normalize_gate_prob_before_dropping,
            eval_capacity_token_fraction=eval_capacity_token_fraction,
            capacity_factor=capacity_factor,
        )
        if use_xmoe:
            self.wg_reduction = nn.Linear(embed_dim, XMOE_DIM, bias=False)
            wg = torch.empty(num_experts, XMOE_DIM)
            nn.init.orthogonal_(wg, gain=0.32)
            self.wg = nn.Parameter(wg)
        else:
            self.wg = nn.Linear(embed_dim, num_experts, bias=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Redraw as the constructor draws (``nn.Linear``'s init; X-MoE's orthogonal ``wg``)."""
        if not self.use_xmoe:
            self.wg.reset_parameters()
            return
        self.wg_reduction.reset_parameters()
        nn.init.orthogonal_(self.wg, gain=0.32)

    def logits(self, x: Tensor, input_norm: Optional[nn.Module] = None) -> Tensor:
        """(S, E) routing scores of the tokens ``input_norm(x)`` (the norm fused into the
        projection, ``magneto.fusion``)."""
        if not self.use_xmoe:
            return project("Gate.wg", x, self.wg, input_norm, backend=self.backend)
        x = project("Gate.wg_reduction", x, self.wg_reduction, input_norm, backend=self.backend)
        with torch.no_grad():
            self.wg.mul_(1.5 / self.wg.norm(p=2.0, dim=1, keepdim=True))
        experts = F.normalize(self.wg.float(), p=2.0, dim=1, eps=1e-4)
        scores = x.float().matmul(experts.transpose(0, 1)).type_as(x)
        finite = scores.isfinite()
        if not finite.all():  # a non-finite score would break the assignment (torchscale)
            scores[~finite] = scores[finite].min()
        return scores

    def forward(
        self,
        x: Tensor,
        padding_mask: Optional[Tensor] = None,
        *,
        input_norm: Optional[nn.Module] = None,
        num_tokens: Optional[int] = None,
    ) -> Routing:
        """The routing of the tokens ``input_norm(x)``; ``num_tokens``: route that many, the
        rows after x's being zero tokens (the padding torchscale's ``MOELayer`` adds after the
        norm: their scores are 0, ``wg`` having no bias and X-MoE's cosine of 0 being 0), which
        ``padding_mask`` marks."""
        logits = self.logits(x, input_norm)
        if num_tokens is not None and num_tokens > logits.shape[0]:
            logits = F.pad(logits, (0, 0, 0, num_tokens - logits.shape[0]))
        return route(logits, self.top, padding_mask, eval_mode=not self.training, **self.options)

    def extra_repr(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"num_experts={self.num_experts}, top={self.top}, use_xmoe={self.use_xmoe}{options}"
