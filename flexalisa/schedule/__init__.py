"""The three-phase scheduler, torch-free: the tier planner and the block (zig-zag) schedule.

Nothing here imports torch; the runner turns these records into copies and kernels.
"""

from flexalisa.schedule.block import (
    BlockOp,
    BlockShape,
    OpKind,
    block_schedule,
    dependencies,
    loads_of,
    stores_of,
)
from flexalisa.schedule.ranges import Move, Placement, Tier, TokenRange
from flexalisa.schedule.tier_plan import (
    DoesNotFit,
    TierPlan,
    TierPlanConfig,
    TierStep,
    boundaries,
    phase_of,
    plan_tiers,
    resolve_phase_starts,
)

__all__ = [
    "BlockOp",
    "BlockShape",
    "DoesNotFit",
    "Move",
    "OpKind",
    "Placement",
    "Tier",
    "TierPlan",
    "TierPlanConfig",
    "TierStep",
    "TokenRange",
    "block_schedule",
    "boundaries",
    "dependencies",
    "loads_of",
    "phase_of",
    "plan_tiers",
    "resolve_phase_starts",
    "stores_of",
]
