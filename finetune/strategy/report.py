"""`finetune plan`: the measured decision as a readable report."""

from __future__ import annotations

from typing import Any

from torch import nn

from finetune.strategy.cost import estimate_sentence
from finetune.strategy.decide import BN_POLICIES
from finetune.strategy.groups import layer_groups
from finetune.strategy.measure import Decision


def group_table(model: nn.Module) -> list[dict[str, Any]]:
    """The model's layer groups (index, name, parameter count), as `finetune plan` lists them."""
    params = dict(model.named_parameters())
    return [{"index": g.index, "name": g.name, "params": sum(params[n].numel() for n in g.param_names),
             "head": g.is_head} for g in layer_groups(model)]


def similarity_lines(s: Any, probe_images: int) -> list[str]:
    """The domain similarity, its components and the probe of each stage; or why it was not measured."""
    if "not_measured" in s.details:
        return [f"Domain similarity  not measured ({s.details['not_measured']})"]
    lines = [f"Domain similarity  {s.score:.3f}  (probe on {probe_images} training images)"]
    for name, value in s.components.items():
        lines.append(f"  {name:<18} {value:.3f}   weight {s.weights.get(name, 0.0):g}")
    lines.append(f"  {'stage':<10} {'module':<28} {'channels':>8}  {'probe acc':>9}  {'normalised':>10}")
    for pr in s.probes:
        mark = "  <- best" if pr.key == s.best_stage else ""
        lines.append(f"  {pr.key:<10} {pr.module:<28} {pr.channels:>8}  {pr.balanced_accuracy:>9.3f}  "
                     f"{pr.normalized:>10.3f}{mark}")
    lines += [f"  {k:<18} {v:.3f}" for k, v in s.details.items() if k.startswith(("source", "bn"))]
    return lines


def describe(decision: Decision, groups: list[dict[str, Any]]) -> str:
    """The decision as a readable report: profile, similarity, scenario, plan, layer groups."""
    p, s, plan = decision.profile, decision.similarity, decision.plan
    lines = ["Dataset profile",
             f"  images       train {p.n_train}, val {p.n_val}, test {p.n_test}, skipped {p.n_skipped}",
             f"  classes      {p.n_classes}; per class min {p.per_class_min}, median {p.per_class_median:g}, "
             f"max {p.per_class_max} (imbalance {p.imbalance_ratio:g}x)",
             f"  images look  {p.grayscale_share:.0%} grayscale, median size {p.median_width}x{p.median_height}",
             "", *similarity_lines(s, decision.probe_images), "", f"Scenario  {plan.scenario}  ({plan.source})"]
    lines += [f"  - {r}" for r in plan.reasons]
    lines += pilot_lines(decision.pilot)
    lines += ["", "Plan",
              f"  head on        {plan.head_stage}" + ("  (cached features)" if plan.train_on_features else ""),
              f"  epochs         {plan.epochs}" + (f" after {plan.head_warmup_epochs} head warm-up epochs on cached features"
                                                   if plan.head_warmup_epochs else ""),
              f"  BatchNorm      {BN_POLICIES[plan.bn_policy]}"]
    if plan.train_on_features:
        lines.append(f"  weight decay   {plan.weight_decay_grid[0]:g}" if len(plan.weight_decay_grid) == 1
                     else f"  weight decay   chosen by cross-validation on train from {plan.weight_decay_grid}")
        if plan.aug_views:
            lines.append(f"  aug views      {plan.aug_views} per image ({plan.cache_augment})")
    lines.append(f"  time           {estimate_sentence(plan, p.to_dict(), decision.timings.get('images_per_s'))}")
    lines += ["", "Layer groups (timm group_matcher; --freeze-groups N freezes the first N)",
              f"  {'#':>3}  {'group':<34} {'params':>10}  {'state':<8} {'lr':>9}"]
    settings = {g.index: g for g in decision.groups}
    for g in groups:
        st = settings.get(g["index"])
        if st is None:
            continue
        state = "frozen" if st.frozen else "learns"
        lr = "" if st.frozen else f"{st.lr:.2e}"
        lines.append(f"  {g['index']:>3}  {g['name'][:34]:<34} {g['params']:>10,}  {state:<8} {lr:>9}")
    return "\n".join(lines)


def pilot_lines(pilot: dict[str, Any] | None) -> list[str]:
    """The pilot's candidates, what each cost and scored, and the winner."""
    if not pilot:
        return []
    lines = ["", f"Pilot  {pilot['seconds']:.0f} s: the candidates competed on {pilot['select_images']} held-out "
                 "training images (val untouched)"]
    lines += [f"  - {r}" for r in pilot["reasons"]]
    lines.append(f"  {'candidate':<16} {'select acc':>10} {'epochs':>7} {'images':>7} {'seconds':>8}")
    for scenario in pilot["candidates"]:
        if scenario in pilot["scores"]:
            v = pilot["scores"][scenario]
            mark = "  <- goes on" if scenario == pilot["winner"] else ""
            if scenario in pilot.get("unresolved", {}):  # the why and what to do: in the scenario's reasons
                w, o = pilot["unresolved"][scenario]
                mark = f"  ~ not separated from the winner: they disagree on {w + o}, the winner right on {w}"
            lines.append(f"  {scenario:<16} {v['select_acc']:>10.3f} {v['epochs']:>7} {v['fit_images']:>7} "
                         f"{v['seconds']:>8.1f}{mark}")
        else:
            lines.append(f"  {scenario:<16} not run: {pilot['skipped'].get(scenario, '')}")
    if pilot["winner"] not in pilot["candidates"]:
        lines.append(f"  {pilot['winner']:<16} {'':>10} {'':>7} {'':>7} {'':>8}  <- goes on")
    if pilot.get("choice"):
        lines.append(f"  - {pilot['choice']}")
    return lines


def unresolved_sentence(pilot: dict[str, Any]) -> str:
    """Which candidates the pilot's selection images cannot tell from its winner, and what to do about it."""
    which = ", ".join(f"{s} ({w} vs {o})" for s, (w, o) in pilot["unresolved"].items())
    return (f"the {pilot['select_images']} selection images cannot separate {pilot['winner']} from {which}, counting "
            "the images only the winner got right vs only the other: the choice is within their noise. To choose "
            "on more data, train each with --scenario and compare them on val (val is then selection data: report "
            "on test/).")
