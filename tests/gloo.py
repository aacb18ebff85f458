"""A one-process gloo group, for tests whose code needs torch.distributed initialised
(torchscale's MoE layers all-reduce their token count over the world; fairscale's FSDP and
torch's fully_shard need a process group), and torchscale's MoE gating made to run on CPU."""

import contextlib
import os
import tempfile

import torch
import torch.distributed as dist


@contextlib.contextmanager
def one_process_group():
    """A world of this process alone, torn down after, with the groups torchscale caches."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            "gloo", init_method="file://" + os.path.join(tmp, "store"), rank=0, world_size=1
        )
        try:
            yield
        finally:
            dist.destroy_process_group()
            from torchscale.component.xmoe import global_groups

            for fn in (global_groups.get_moe_group, global_groups.get_all2all_group):
                for attr in [a for a in vars(fn) if a.startswith("_")]:
                    delattr(fn, attr)  # torchscale caches its groups on these functions


def float_histc(monkeypatch) -> None:
    """torchscale's gating logs a histogram of int64 expert indices, which ``torch.histc``
    supports on CUDA only: hand it floats (no result depends on that logging)."""
    histc = torch.histc
    monkeypatch.setattr(torch, "histc", lambda x, *args, **kw: histc(x.float(), *args, **kw))
