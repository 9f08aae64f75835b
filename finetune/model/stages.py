"""Names of the places a head can sit: the final pooled features (`FINAL`) or an earlier stage ("stage<i>").

Pure (no torch): the decision names head stages too, and it must import without torch.
"""

from __future__ import annotations

FINAL = "final"


def stage_index(head_stage: str) -> int | None:
    """The feature_info index of a plan's head stage ("stage3" -> 3); None for the final features."""
    return None if head_stage == FINAL else int(head_stage.removeprefix("stage"))
