"""The canary's statistics: a proportion's interval and the two one-sided tests between arms."""

from __future__ import annotations

import math
from statistics import NormalDist


def normal_cdf(z: float) -> float:
    """Phi(z), the standard normal CDF, exact at +-inf."""
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: stays inside [0, 1] and behaves at 0 or n successes.

    The plain Wald interval p +- z*sqrt(p(1-p)/n) collapses to a point at p = 0 and spills
    below 0 for small counts; Wilson's does neither, which matters for a young canary.
    """
    if trials <= 0:
        return (0.0, 1.0)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def z_test_worse(x_new: int, n_new: int, x_base: int, n_base: int) -> tuple[float, float]:
    """One-sided two-proportion z-test of H1: p_new < p_base. Returns (z, p-value).

    Under H0 (p_new = p_base) both samples share one rate, so the standard error uses the
    pooled proportion x / n over both arms: z = (p_new - p_base) / sqrt(p(1-p)(1/n1 + 1/n2)),
    and the p-value is Phi(z) (small when the new arm is clearly lower).
    """
    if n_new <= 0 or n_base <= 0:
        return (0.0, 1.0)
    p_new, p_base = x_new / n_new, x_base / n_base
    pooled = (x_new + x_base) / (n_new + n_base)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_new + 1 / n_base))
    diff = p_new - p_base
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return (z, normal_cdf(z))


def z_test_not_worse(x_new: int, n_new: int, x_base: int, n_base: int, margin: float) -> tuple[float, float]:
    """One-sided non-inferiority z-test of H1: p_new - p_base > -margin. Returns (z, p-value).

    The null hypothesis is "the new arm is worse by the margin or more" (p_new - p_base <=
    -margin): the two rates differ under it, so the standard error is unpooled (Wald):
    z = (p_new - p_base + margin) / sqrt(p_new(1-p_new)/n_new + p_base(1-p_base)/n_base),
    p-value = 1 - Phi(z). With margin 0 this is the superiority test of H1: p_new > p_base.
    """
    if n_new <= 0 or n_base <= 0:
        return (0.0, 1.0)
    p_new, p_base = x_new / n_new, x_base / n_base
    se = math.sqrt(p_new * (1 - p_new) / n_new + p_base * (1 - p_base) / n_base)
    shifted = p_new - p_base + margin
    z = shifted / se if se > 0 else (0.0 if shifted == 0 else math.copysign(math.inf, shifted))
    return (z, 1.0 - normal_cdf(z))
