"""Methods that select by position only: dense, local, sinks, strided (see ``methods.py``)."""

from __future__ import annotations

import torch
from torch import Tensor

from flexalisa.attention.base import MethodState, SparsityMethod
from flexalisa.attention.selection import Selection, first_mask, recent_mask

NUM_SINKS = 4  # StreamingLLM's attention-sink tokens


class Dense(SparsityMethod):
    """Attend every valid token; ``select`` returns None."""

    name = "dense"

    def select(
        self,
        state: MethodState,
        layer_idx: int,
        valid: Tensor,
        q: Tensor | None = None,
        keys: Tensor | None = None,
    ) -> Selection | None:
        return None


class Local(SparsityMethod):
    """Sliding window of the newest ``total`` tokens."""

    name = "local"

    def _mask(self, pos: Tensor, num_valid: Tensor, valid: Tensor) -> Tensor:
        num_local, num_global = self.budget(num_valid)
        return recent_mask(pos, num_valid, num_local + num_global, valid)


class Sinks(SparsityMethod):
    """StreamingLLM: the first 4 tokens (fewer if the budget is tiny) plus the newest."""

    name = "sinks"

    def _mask(self, pos: Tensor, num_valid: Tensor, valid: Tensor) -> Tensor:
        num_local, num_global = self.budget(num_valid)
        total = num_local + num_global
        num_sinks = torch.minimum(total - 1, torch.full_like(total, NUM_SINKS))
        first = first_mask(pos, num_sinks, valid)
        return first | recent_mask(pos, num_valid, total - num_sinks, valid)


class Strided(SparsityMethod):
    """The newest ``num_local`` plus ``num_global`` older tokens at a fixed stride."""

    name = "strided"

    def _mask(self, pos: Tensor, num_valid: Tensor, valid: Tensor) -> Tensor:
        num_local, num_global = self.budget(num_valid)
        older = (num_valid - num_local)[:, None]  # (B, 1): m, tokens older than the window
        glob = num_global[:, None].clamp_min(1)  # (B, 1)
        # pos is on the grid iff pos = floor(i m / g) for some integer i < g, i.e. iff
        # ceil(pos g / m) * m < (pos + 1) g  (the smallest such i lands inside [pos, pos+1))
        first_i = (pos * glob + older - 1) // older.clamp_min(1)  # ceil(pos g / m), (B, S)
        on_grid = (first_i * older < (pos + 1) * glob) & (first_i < glob)
        strided = valid & on_grid & (pos < older) & (num_global[:, None] > 0)
        return strided | recent_mask(pos, num_valid, num_local, valid)
