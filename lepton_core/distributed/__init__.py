"""Collectives over shared memory, on torch.distributed (API.md §3).

    import lepton_core.distributed as ld
    ld.all_reduce(t)                                     # sum, in place, bitwise identical on all ranks
    ld.all_reduce(t, "avg", compression="int8")          # blockwise int8 on every hop
    ld.reduce_scatter(out, inp)                          # rank r: chunk r of inp, summed over ranks
    ld.all_gather(out, inp)                              # the ranks' inputs in rank order
    ld.broadcast(t, src=0)                               # rank 0's t everywhere, in place
    model.register_comm_hook(ld.HookState(), ld.allreduce_hook)   # DDP, int8 + error feedback

Ranks on one host talk through shared memory; a group spanning hosts reduces hierarchically
(shared memory inside each host, torch.distributed between hosts). LEPTON_TRANSPORT=shm|torch
forces a transport; LEPTON_HOST_ID overrides the host identity.
"""
from .._arrays import require_torch

require_torch("lepton_core.distributed")

from ._all_gather import all_gather  # noqa: E402
from ._allreduce import CommError, all_reduce  # noqa: E402
from ._broadcast import broadcast  # noqa: E402
from ._reduce_scatter import reduce_scatter  # noqa: E402
from .hooks import HookState, allreduce_hook  # noqa: E402

__all__ = ["CommError", "HookState", "all_gather", "all_reduce", "allreduce_hook", "broadcast", "reduce_scatter"]
