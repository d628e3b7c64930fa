"""The three-phase tier planner (ALISA Algorithm 2 at token level), torch-free.

For each generation step (step 0 = prefill, steps 1.. = decode) it says where every token slot
of one sequence batch lives, what moves this step, and where the step's new tokens go. The
layout is the same for every (layer, GPU batch) store, so one plan serves them all.

Two step numberings, on purpose:
  * ``step_idx`` (``TierStep``, and ``BlockOp`` of the block schedule) counts *generation*
    steps: 0 is the prefill, 1 .. gen_len-1 the decode steps;
  * ``phase2_start_step`` / ``phase3_start_step`` follow the ``Policy`` and the cost model:
    they are *decode*-step indices (0 = the first decode step = generation step 1), and the
    prefill belongs to decode step 0's phase. So a start ``d`` takes effect at generation step
    ``0`` if ``d == 0`` else ``d + 1``, and a start ``>= gen_len - 1`` is never reached.

Tier split of slots ``[0, n)`` at a step (tiers are contiguous, oldest on the left)::

    slot 0                         r                      c                        n
      |  recompute (K,V dropped;   |  CPU tier (host K,V,  |  GPU tier (device K,V) |
      |  layer-input hidden kept)  |  maybe INT8/INT4)     |  newest tokens         |

    phase I   (decode step <  phase2_start_step):     r = 0,             c = 0
    phase II  (phase2_start <= decode step < phase3): r = 0,             c = ⌊cpu·n⌋
    phase III (decode step >= phase3_start_step):     r = ⌊recompute·n⌋, c = ⌊(recompute+cpu)·n⌋

Rounding: both boundaries are floors of *cumulative* shares, so every tier's token count is
within one token (strictly) of ``share · n`` — recompute and CPU round down, the GPU rounds up.
Because r and c never decrease as n grows and the phase advances, a token only ever moves
older-ward (GPU → CPU → recompute). Fetching selected tokens for attention is transient and is
not a move.

Timing within a step, for each (layer, batch): the attention of step s reads the layout of step
s-1 plus the new tokens (still on the device); the step's *store* then applies ``moves`` (to
tokens already stored) and places the new tokens per ``new_tokens``, giving the layout recorded
in step s's ``TierStep``. A static FlexGen-style split is ``phase2_start_step = 0`` with no
recompute share: the prefill's KV is stored split. With no recompute share, phase III never
begins, whatever its start says (its layout would be phase II's).

Phase starts may be given or derived from token capacities of one store: phase II starts at
the first decode step whose all-on-GPU layout exceeds ``gpu_capacity_tokens`` (0 when the
prefill already does); phase III at the first decode step (not before phase II) whose phase-II
layout exceeds either capacity. A layout that does
not fit is returned as ``DoesNotFit`` (a value, not an error); misuse raises ``ValueError``.
Capacities count home placement only; the runner's working set (new tokens before the store,
fetched selections) is its own to budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flexalisa.schedule.ranges import Move, Placement, Tier, TokenRange

_ROUNDING_SLACK = 1e-9  # keeps 0.3·10 = 2.9999999999999996 from flooring to 2


@dataclass(frozen=True)
class TierPlanConfig:
    """What the planner needs; the runner fills it from its Policy and budgets."""

    prompt_len: int  # prompt slots (left-padded to one length), written by the prefill
    gen_len: int  # generation steps including the prefill (step 0); >= 1
    kv_gpu_share: float  # share of slots on the GPU once all phases are reached, in [0, 1]
    kv_cpu_share: float  # share on the CPU tier, in [0, 1]
    kv_recompute_share: float  # share with K,V dropped (recomputed from hidden), in [0, 1]
    phase2_start_step: int | None = None  # decode step phase II starts; None = from capacity
    phase3_start_step: int | None = None  # decode step phase III starts (>= phase II); None too
    gpu_capacity_tokens: int | None = None  # max GPU-tier slots per store; None = unchecked
    cpu_capacity_tokens: int | None = None  # max CPU-tier slots per store; None = unlimited

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.gen_len < 1:
            raise ValueError(f"need prompt_len >= 1 and gen_len >= 1, got "
                             f"{self.prompt_len}, {self.gen_len}")
        shares = (self.kv_gpu_share, self.kv_cpu_share, self.kv_recompute_share)
        if any(not 0.0 <= share <= 1.0 for share in shares):
            raise ValueError(f"KV shares must lie in [0, 1], got {shares}")
        if abs(sum(shares) - 1.0) > 1e-6:
            raise ValueError(f"KV shares must sum to 1, got {shares} (sum {sum(shares)})")
        for name in ("phase2_start_step", "phase3_start_step",
                     "gpu_capacity_tokens", "cpu_capacity_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        phase2, phase3 = self.phase2_start_step, self.phase3_start_step
        if phase2 is not None and phase3 is not None and phase3 < phase2:
            raise ValueError(f"phase3_start_step {phase3} < phase2_start_step {phase2}")
        if phase2 is None and self.gpu_capacity_tokens is None:
            raise ValueError("phase2_start_step is None and there is no gpu_capacity_tokens "
                             "to derive it from")
        if phase3 is None and self.gpu_capacity_tokens is None:
            raise ValueError("phase3_start_step is None and there is no gpu_capacity_tokens "
                             "to derive it from")

    def num_tokens_at(self, step_idx: int) -> int:
        """Slots stored after generation step ``step_idx``: the prompt, plus one per decode."""
        return self.prompt_len + step_idx


@dataclass(frozen=True)
class TierStep:
    """The tier layout after one step's store, and how to get there from the previous step."""

    step_idx: int  # generation step, as BlockOp.step_idx: 0 = prefill, then one per decode
    phase: int  # 1: all on GPU; 2: oldest on CPU; 3: oldest also dropped (recompute)
    num_tokens: int  # n: slots [0, n) are stored after this step
    recompute: TokenRange  # [0, r): K,V dropped, hidden kept
    cpu: TokenRange  # [r, c): K,V in the CPU tier
    gpu: TokenRange  # [c, n): K,V in the GPU tier
    moves: tuple[Move, ...]  # moves of already-stored slots, in order, before placing new ones
    new_tokens: tuple[Placement, ...]  # where this step's new slots go, oldest run first
    keep_hidden: TokenRange  # new slots whose layer-input hidden must be kept (may be dropped)

    def tier_of(self, slot: int) -> Tier:
        """The tier holding ``slot`` after this step."""
        if not 0 <= slot < self.num_tokens:
            raise ValueError(f"slot {slot} outside [0, {self.num_tokens})")
        if slot < self.recompute.end:
            return Tier.RECOMPUTE
        return Tier.CPU if slot < self.cpu.end else Tier.GPU


@dataclass(frozen=True)
class TierPlan:
    """A resolved plan: phase starts and one ``TierStep`` per generation step."""

    phase2_start_step: int  # resolved decode step; >= gen_len - 1 means never reached
    phase3_start_step: int  # resolved decode step; >= gen_len - 1 means never reached
    steps: tuple[TierStep, ...]  # steps[i].step_idx == i

    @property
    def max_gpu_tokens(self) -> int:
        """GPU-tier slots a store must hold at its peak."""
        return max(len(step.gpu) for step in self.steps)

    @property
    def max_cpu_tokens(self) -> int:
        """CPU-tier slots a store must hold at its peak."""
        return max(len(step.cpu) for step in self.steps)

    @property
    def hidden_tokens(self) -> int:
        """Slots [0, this) ever reach the recompute tier, so their hidden states are kept."""
        return self.steps[-1].recompute.end


@dataclass(frozen=True)
class DoesNotFit:
    """The plan needs more of a tier than its capacity at some step."""

    step_idx: int  # first generation step (0 = prefill) that does not fit
    phase: int  # its phase
    tier: Tier  # the tier that overflows
    needed_tokens: int  # slots the layout puts there
    capacity_tokens: int  # slots available

    @property
    def message(self) -> str:
        return (f"step {self.step_idx} (phase {self.phase}) needs {self.needed_tokens} "
                f"{self.tier.value}-tier tokens per store but only {self.capacity_tokens} fit; "
                f"raise the budget or move more of the KV to older tiers")


def _floor_share(share: float, num_tokens: int) -> int:
    return min(num_tokens, math.floor(share * num_tokens + _ROUNDING_SLACK))


def decode_step_of(step_idx: int) -> int:
    """The decode-step index whose phase generation step ``step_idx`` runs in (prefill: 0)."""
    return max(step_idx - 1, 0)


def phase_of(step_idx: int, phase2_start_step: int, phase3_start_step: int) -> int:
    """1, 2 or 3 for generation step ``step_idx`` under resolved (decode-step) phase starts."""
    decode_step = decode_step_of(step_idx)
    if decode_step >= phase3_start_step:
        return 3
    return 2 if decode_step >= phase2_start_step else 1


def boundaries(config: TierPlanConfig, phase: int, num_tokens: int) -> tuple[int, int]:
    """(r, c): recompute is [0, r), CPU [r, c), GPU [c, n) at ``num_tokens`` slots."""
    if phase == 1:
        return 0, 0
    if phase == 2:
        return 0, _floor_share(config.kv_cpu_share, num_tokens)
    older_share = config.kv_recompute_share + config.kv_cpu_share
    return (_floor_share(config.kv_recompute_share, num_tokens),
            _floor_share(older_share, num_tokens))


def _overflow(config: TierPlanConfig, step_idx: int, phase: int) -> DoesNotFit | None:
    """The first tier the layout of ``phase`` overflows at ``step_idx``, if any."""
    num_tokens = config.num_tokens_at(step_idx)
    recompute_end, cpu_end = boundaries(config, phase, num_tokens)
    checks = ((Tier.GPU, num_tokens - cpu_end, config.gpu_capacity_tokens),
              (Tier.CPU, cpu_end - recompute_end, config.cpu_capacity_tokens))
    for tier, needed, capacity in checks:
        if capacity is not None and needed > capacity:
            return DoesNotFit(step_idx, phase, tier, needed, capacity)
    return None


def resolve_phase_starts(config: TierPlanConfig) -> tuple[int, int] | DoesNotFit:
    """(phase2_start_step, phase3_start_step), derived where None; or the first misfit."""
    steps, never = range(config.gen_len), config.gen_len
    phase2 = config.phase2_start_step
    if phase2 is None:
        overflow = next((s for s in steps if _overflow(config, s, 1)), None)
        phase2 = never if overflow is None else decode_step_of(overflow)
    phase3 = config.phase3_start_step
    if config.kv_recompute_share == 0:  # phase III would lay out as phase II: it never begins
        phase3 = never
    elif phase3 is None:
        first = 0 if phase2 == 0 else phase2 + 1  # the generation step phase II starts at
        overflow = next((s for s in range(first, config.gen_len) if _overflow(config, s, 2)),
                        None)
        phase3 = never if overflow is None else decode_step_of(overflow)
    phase2 = min(phase2, phase3)  # a given phase III start may come before the derived phase II
    for step_idx in steps:
        misfit = _overflow(config, step_idx, phase_of(step_idx, phase2, phase3))
        if misfit is not None:
            return misfit
    return phase2, phase3


def _step(config: TierPlanConfig, step_idx: int, phase: int, prev: TierStep | None,
          hidden_tokens: int) -> TierStep:
    num_tokens = config.num_tokens_at(step_idx)
    recompute_end, cpu_end = boundaries(config, phase, num_tokens)
    recompute = TokenRange(0, recompute_end)
    cpu = TokenRange(recompute_end, cpu_end)
    gpu = TokenRange(cpu_end, num_tokens)
    old = prev  # the layout after the previous step's store (None before the prefill)
    moves: list[Move] = []
    if old is not None:
        # boundaries never decrease, so nothing moves back newer-ward
        assert old.recompute.end <= recompute_end and old.cpu.end <= cpu_end, (old, step_idx)
        for src_range, src, dst_range, dst in ((old.cpu, Tier.CPU, recompute, Tier.RECOMPUTE),
                                               (old.gpu, Tier.GPU, recompute, Tier.RECOMPUTE),
                                               (old.gpu, Tier.GPU, cpu, Tier.CPU)):
            moved = src_range.intersect(dst_range)
            if len(moved):
                moves.append(Move(moved, src, dst))
    new = TokenRange(old.num_tokens if old is not None else 0, num_tokens)
    placements = tuple(Placement(new.intersect(home), tier)
                       for home, tier in ((recompute, Tier.RECOMPUTE), (cpu, Tier.CPU),
                                          (gpu, Tier.GPU))
                       if len(new.intersect(home)))
    return TierStep(step_idx=step_idx, phase=phase, num_tokens=num_tokens,
                    recompute=recompute, cpu=cpu, gpu=gpu, moves=tuple(moves),
                    new_tokens=placements, keep_hidden=new.intersect(TokenRange(0, hidden_tokens)))


def plan_tiers(config: TierPlanConfig) -> TierPlan | DoesNotFit:
    """One ``TierStep`` per generation step, or the first step whose layout does not fit."""
    starts = resolve_phase_starts(config)
    if isinstance(starts, DoesNotFit):
        return starts
    phase2, phase3 = starts
    last_step = config.gen_len - 1
    final_phase = phase_of(last_step, phase2, phase3)
    hidden_tokens = boundaries(config, final_phase, config.num_tokens_at(last_step))[0]
    steps: list[TierStep] = []
    for step_idx in range(config.gen_len):
        phase = phase_of(step_idx, phase2, phase3)
        steps.append(_step(config, step_idx, phase, steps[-1] if steps else None, hidden_tokens))
    return TierPlan(phase2_start_step=phase2, phase3_start_step=phase3, steps=tuple(steps))
