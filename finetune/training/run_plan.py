"""The executor: the only place that knows there are two kinds of plan.

`run_plan` takes the decided plan and returns a `FitResult`. Feature plans (small-*) train a linear
head on cached features of the frozen backbone; network plans (large-*, and everything from random
init) warm the head up on cached features, then fine-tune the planned layer groups with Lightning,
and the best checkpoint (or the warmed-up head, when fine-tuning did not beat it) is what returns.

Every choice is made on data inside the training split: cross-validation on cached features for
linear heads, a selection split carved from train for the network. The user's val and test splits
are not read here, except a feature plan's cached centre-crop probabilities on them, computed after
its head is final, for the report."""

from __future__ import annotations

from finetune import runtime, timing
from finetune.config import TrainConfig
from finetune.data.folders import FolderSplits
from finetune.model.backbone import Backbone
from finetune.strategy.measure import Decision
from finetune.training.feature_plans import fit_feature_plan
from finetune.training.network_plans import fit_network_plan
from finetune.training.plan_context import FitResult, RunContext
from finetune.training.recipe import Recipe


@timing.timed("fit")
def run_plan(cfg: TrainConfig, decision: Decision, recipe: Recipe, backbone: Backbone, splits: FolderSplits,
             ctx: RunContext, rt: runtime.Runtime) -> FitResult | None:
    """Execute the decided plan; None on the ranks other than 0 of a multi-process run."""
    if decision.plan.train_on_features:
        return fit_feature_plan(cfg, decision, recipe, backbone, splits, ctx.logger, rt, ctx.features_within)
    return fit_network_plan(cfg, decision, recipe, backbone, splits, ctx, rt)
