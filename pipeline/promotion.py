"""Whether a registered candidate should replace the champion: only if it is better by more than noise.

Plain numbers in, a decision out (no MLflow): the registry (pipeline/tracking/registry.py) reads the
accuracies from the model versions and moves the alias when told to. The noise margin is
`pipeline compare`'s approximate 95 % binomial margin, so `promote` and `compare` agree on
what counts as a real difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Score:
    """A model version's test accuracy and the number of test images it was measured on."""

    version: str
    accuracy: float
    images: int


@dataclass(frozen=True)
class Decision:
    promote: bool
    message: str  # one line, with the numbers it was taken on
    delta: float = math.nan  # candidate minus champion accuracy
    margin: float = math.nan  # the approximate 95 % noise margin of delta


def decide(candidate: Score, champion: Score | None, force: bool = False) -> Decision:
    """Promote `candidate` if there is no champion, or if it beats the champion by more than the margin."""
    # Here, not at the top: the registry imports this module on the predictor's path, which stays
    # free of torch, and compare's module imports the evaluate stage.
    from pipeline.compare import binomial_margin

    if champion is None:
        return Decision(True, f"No champion yet: v{candidate.version} ({candidate.accuracy:.2%}) becomes the champion")
    if champion.version == candidate.version:
        return Decision(False, f"Already the champion: v{candidate.version} ({candidate.accuracy:.2%})")
    delta = candidate.accuracy - champion.accuracy
    margin = binomial_margin(champion.accuracy, champion.images, candidate.accuracy, candidate.images)
    numbers = (
        f"candidate v{candidate.version} {candidate.accuracy:.2%} vs champion v{champion.version} "
        f"{champion.accuracy:.2%}: {100 * delta:+.2f} pp"
    )
    if math.isnan(margin):
        numbers += ", noise margin unknown (no test-set size recorded)"
        beats = False
    else:
        numbers += f", noise margin ±{100 * margin:.2f} pp"
        beats = delta > margin
    if beats:
        return Decision(True, f"Promoted: {numbers}", delta, margin)
    if force:
        return Decision(True, f"Promoted by --force: {numbers}", delta, margin)
    return Decision(
        False,
        f"Kept champion v{champion.version}: {numbers}; the candidate must be better by more than the "
        "margin (--force promotes it anyway)",
        delta,
        margin,
    )
