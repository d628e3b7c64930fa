"""KV sparsity methods: which cached tokens each decode step attends to.

Every method keeps the full KV cache; it only *selects*. The runtime keeps all KV in some tier
and fetches only the selected tokens. Engine contract, per layer ``layer_idx``::

    method = make_method("swa", sparsity=0.8, per_kv_head=False)
    state = method.init_state(batch, num_layers, num_kv_heads, max_len, device)
    # prefill: probs (B, Hq, T, S) float32 softmax over the prompt, T queries at the last T
    # slots; valid (B, S) bool, False = left padding
    method.observe_prefill(state, layer_idx, probs, valid)
    # each decode step, before attention; valid (B, S) covers every cached token, the new
    # token included at slot S-1 (which is always selected)
    sel = method.select(state, layer_idx, valid, q=q, keys=k)  # None = dense; q, keys optional
    out, lse, probs = selected_attention(q, k, v, sel.indices, sel.mask, with_lse=True)
    # (= gather_kv(k, v, sel.indices), then partial_attention_probs over the gathered K, V)
    method.observe(state, layer_idx, probs, sel)            # probs (B, Hq, 1, K)

Call ``select`` then ``observe`` once per layer per decode step, in step order. ``max_len`` is
the largest cache length S the engine will reach; slots are stable (the cache grows on the right).
``method.needs_scores`` is False when ``observe*`` are no-ops, so the engine may skip probs.

Budget (see ``budget.py``): n = valid tokens of the row, k = round(n (1 - s) / 2) half-up;
num_local = min(max(k, 1), n) newest tokens, num_global = min(k, n - num_local); every sparse
method attends exactly num_local + num_global tokens (all n when s = 0).

Methods (ties: lower slot wins):
  dense    None: attend every valid token.
  local    the newest num_local + num_global tokens (sliding window).
  sinks    StreamingLLM: the first min(4, total - 1) valid tokens + the newest for the rest.
  strided  the num_local newest + num_global tokens spread at a fixed stride over the m = n -
           num_local older ones, positions floor(i * m / num_global), i = 0..num_global-1
           (positions among valid tokens; the first token is always one of them; the stride
           m / num_global ~ 2 / r - 1 is nearly constant in n).
  h2o      the num_local newest + the num_global heavy hitters: top attention summed over
           every row so far (prefill rows + decode steps; unselected tokens get 0 per step).
  swa      ALISA Algorithm 1: the num_local newest + the num_global top by the attention
           summed over the last k rows, excluding the local ones. The rows are the
           attention of the queries before this step, oldest first: the prompt's queries
           (the seed), then one per decode step; with k = k(n) of this step. One set per
           layer per sequence; ``per_kv_head=True`` scores and selects per KV head, summing
           only the query heads of that KV group. Bookkeeping: ``scores.py``.
           ``query_channels=r > 0``: the global part is instead the top-k by SparQ's estimate
           of the current step's attention from the query's r largest channels, when the
           caller passes ``select(..., q=q, keys=keys)`` (``query_aware.py``; it reads r/D of
           K for every older token each step). Without q/keys: the paper's form above.
Scores are summed over query heads (all heads, or one KV group's heads with per_kv_head).
Selections have Hsel = Hkv only for score methods with per_kv_head and s > 0, else Hsel = 1.

Host syncs: ``select`` reads K (the row width) back to the host once; score-based methods
once per step (their ``StepBudget``, shared by the layers), plus SWA's window trim per layer.

Runs of layers (SWA): a layer's selection depends only on its own scores and the step's
budget, so when ``select`` is called for a layer, the layers after it that have also observed
their previous step are trimmed and scored with it, as one record with a layer axis, and
their selections wait for their own ``select`` call (``MethodState.ahead``). The same sums
as one layer at a time, in about one layer's tensor ops instead of one per layer.
"""

from __future__ import annotations

from flexalisa.attention.base import MethodState, SparsityMethod
from flexalisa.attention.positional import Dense, Local, Sinks, Strided
from flexalisa.attention.scored import H2O, SWA
from flexalisa.attention.selection import Selection

__all__ = [
    "H2O",
    "METHODS",
    "SWA",
    "Dense",
    "Local",
    "MethodState",
    "Selection",
    "Sinks",
    "SparsityMethod",
    "Strided",
    "make_method",
]

METHODS: dict[str, type[SparsityMethod]] = {
    cls.name: cls for cls in (Dense, SWA, H2O, Local, Strided, Sinks)
}


def make_method(
    name: str, sparsity: float, per_kv_head: bool = False, query_channels: int = 0
) -> SparsityMethod:
    """Build a method by name; ValueError on an unknown name, a sparsity outside [0, 1), or
    ``query_channels`` (SWA's query-aware global selection, 0 = off) on another method."""
    if name not in METHODS:
        raise ValueError(f"unknown sparsity method {name!r}; choose one of {sorted(METHODS)}")
    if name == SWA.name:
        return SWA(sparsity=sparsity, per_kv_head=per_kv_head, query_channels=query_channels)
    if query_channels:
        raise ValueError(f"query_channels={query_channels!r} applies to swa only, not {name!r}")
    return METHODS[name](sparsity=sparsity, per_kv_head=per_kv_head)
