"""Is a training step healthy? A pure rule over the loss and gradient-norm history.

The rule (``HealthRule``), applied at every step whose metrics the loop reads (each
log / checkpoint step):

1. **Finite**: the loss, the gradient norm (before clipping) and, when the loop checks
   them, the trainable parameters are finite. A non-finite value means *diverged* at once.
2. **Bounded gradient**: once ``warmup`` healthy norms are in the history, the gradient
   norm must be at most ``factor`` × the median of the last ``window`` healthy norms.
   A norm above the bound makes the step *unhealthy*: its state is not checkpointed and
   its norm does not enter the history (so a sustained blow-up stays flagged instead of
   raising its own bar). ``patience`` consecutive unhealthy checks mean *diverged*.

Why the norm before clipping: clipping (on by default) bounds each update, so the loss
can stay finite for many steps while the gradients explode; the raw norm shows it. The
median, not the mean, so that one spike does not raise the bar.

A checkpoint is kept only at a *healthy* step, so the "last healthy checkpoint" named by
the divergence error is one the run can trust.

What the user should do after a divergence (the message says it): lower the learning
rate and **start over with --restart**. Resuming the healthy checkpoint with another
rate is refused by ``run_dir.check_resume``: the result would come from two rates, and
no config could reproduce it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

__all__ = [
    "HEALTHY",
    "UNHEALTHY",
    "DIVERGED",
    "HealthRule",
    "HealthState",
    "assess",
    "divergence_message",
]

HEALTHY, UNHEALTHY, DIVERGED = "healthy", "unhealthy", "diverged"


@dataclasses.dataclass(frozen=True)
class HealthRule:
    factor: float = 10.0  # bound = factor × running median of healthy gradient norms
    window: int = 50  # how many recent healthy norms the median looks at
    warmup: int = 5  # healthy norms needed before the bound applies
    patience: int = 3  # consecutive unhealthy checks that count as a divergence

    def __post_init__(self) -> None:
        if not (self.factor > 1 and math.isfinite(self.factor)):
            raise ValueError(f"HealthRule.factor must be a finite number > 1, got {self.factor}")
        if self.window < 1 or self.warmup < 1 or self.patience < 1:
            raise ValueError("HealthRule.window, warmup and patience must be >= 1")


@dataclasses.dataclass(frozen=True)
class HealthState:
    """What the rule remembers between checks (immutable; ``assess`` returns a new one)."""

    norms: tuple[float, ...] = ()  # recent healthy gradient norms, oldest first
    last_healthy_step: int | None = None
    unhealthy_run: int = 0  # consecutive unhealthy checks so far
    reason: str | None = None  # why the last check was not healthy


def bound(rule: HealthRule, state: HealthState) -> float:
    """The current gradient-norm bound (inf during warm-up)."""
    if len(state.norms) < rule.warmup:
        return math.inf
    return rule.factor * statistics.median(state.norms[-rule.window :])


def assess(
    rule: HealthRule,
    state: HealthState,
    step: int,
    loss: float,
    grad_norm: float,
    params_finite: bool = True,
) -> tuple[str, HealthState]:
    """Judge ``step``; returns (HEALTHY | UNHEALTHY | DIVERGED, the new state)."""
    loss, grad_norm = float(loss), float(grad_norm)
    if not (math.isfinite(loss) and math.isfinite(grad_norm) and params_finite):
        what = (
            f"loss={loss}, gradient norm={grad_norm}"
            if params_finite
            else "non-finite trainable parameters"
        )
        reason = f"non-finite values at step {step} ({what})"
        return DIVERGED, dataclasses.replace(state, unhealthy_run=0, reason=reason)
    limit = bound(rule, state)
    if grad_norm <= limit:
        norms = (*state.norms, grad_norm)[-rule.window :]
        return HEALTHY, HealthState(norms=norms, last_healthy_step=step)
    run = state.unhealthy_run + 1
    reason = (
        f"gradient norm {grad_norm:.4g} at step {step} is above {limit:.4g} "
        f"({rule.factor:g} x the median of the last {min(len(state.norms), rule.window)} "
        "healthy norms)"
    )
    verdict = DIVERGED if run >= rule.patience else UNHEALTHY
    if verdict == DIVERGED:
        reason += f", for {run} checks in a row"
    return verdict, dataclasses.replace(state, unhealthy_run=run, reason=reason)


def divergence_message(
    state: HealthState,
    *,
    learning_rate: float,
    last_healthy_checkpoint: int | None,
    checkpoint_dir: str | None,
) -> str:
    """The one-line message of a divergence: what happened, what was kept, what to do."""
    kept = (
        f"the last healthy checkpoint is step {last_healthy_checkpoint} in {checkpoint_dir}"
        if last_healthy_checkpoint is not None
        else "no healthy checkpoint was saved"
    )
    healthy = (
        f"last healthy step {state.last_healthy_step}"
        if state.last_healthy_step is not None
        else "no step was healthy"
    )
    return (
        f"training diverged: {state.reason}; {healthy}; {kept}. Lower the learning rate "
        f"(e.g. --config.optim.learning_rate={learning_rate / 10:g}, now {learning_rate:g}) "
        "and start over with --restart (a resume with another rate is refused, since no "
        "single config would describe the result)"
    )
