"""Expert parallelism for Qwen2-MoE: each rank holds E/N of a layer's routed experts.

Every rank holds the whole router (replicated, in float as loaded) and routes every token the
same way. It runs the (token, expert) pairs whose expert it holds; the other pairs get weight
zero here and are computed by their owner. The shared expert is split like a dense MLP
(gate/up by output, down by input) and left unreduced, so a single all_sum adds up the routed
experts of every rank and the shared expert's partial outputs:

    y = all_sum( sum_{k: expert_k on this rank} w_k * expert_k(x)
                 + sigmoid(shared_expert_gate(x)) * shared_expert_partial(x) )

which is transformers' `Qwen2MoeSparseMoeBlock` (see moe.py): the gate factor is one number
per token, so it multiplies the partial sums as it would their total.
"""

from __future__ import annotations

import mlx.core as mx

from qwen2_mlx.moe import SparseMoeBlock


class ExpertParallelMoeBlock(SparseMoeBlock):
    """`SparseMoeBlock` whose `switch_mlp` holds experts `first_expert ..` of the layer's E.

    Pairs routed to another rank's experts are sent to local expert 0 and masked out: a
    computation graph has fixed shapes, so each rank computes k pairs per token and keeps
    its own (on a Mac the extra pairs re-read one expert's weights, which decode is bound by).
    """

    group: mx.distributed.Group
    first_expert: int
    local_experts: int

    def __call__(self, x: mx.array) -> mx.array:
        router_logits = self.gate(x)
        if self.router_logits_sink is not None:
            self.router_logits_sink(router_logits)
        weights, experts = self.route(router_logits)
        local = experts.astype(mx.int32) - self.first_expert
        owned = (local >= 0) & (local < self.local_experts)
        y = self.switch_mlp(x, mx.where(owned, local, 0).astype(experts.dtype))
        y = mx.where(owned[..., None], y * weights[..., None].astype(y.dtype), 0)
        routed = y.sum(axis=-2).astype(x.dtype)
        shared = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return mx.distributed.all_sum(routed + shared, group=self.group)
