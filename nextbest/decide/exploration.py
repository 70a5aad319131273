"""Exploration with logged propensities: which arm a decision shows, and with what
probability, so off-policy evaluation can reweight the logs later.

One decision explores over a small list of arms, one of which the caller names as
the greedy choice (`greedy`). Strategies (spec `exploration.strategy`):
- `none`: always the greedy arm; probabilities are one-hot.
- `epsilon_greedy`: with probability epsilon a uniformly random arm, else the greedy
  one, so the greedy arm has 1 - eps + eps/n and every other arm eps/n (exact).
- `thompson`: the argmax of the scores plus Gaussian noise (sigma = `THOMPSON_NOISE`
  times the score spread: the spec declares no posterior, so the scores' own range is
  the scale), mixed with epsilon-uniform like `nextbest.demo.offer_sim.action_probabilities`
  so no arm has probability 0. Its probabilities are Monte-Carlo estimates over
  `THOMPSON_DRAWS` draws that include the draw actually used, so the chosen arm's
  logged propensity is never 0.

Every draw comes from a generator seeded by the decision id: the same id with the
same inputs replays the same choice. Epsilon-greedy uses `random.Random` (a few
microseconds to seed); only Thompson pays for a numpy generator and its draws.
"""

import random
from collections.abc import Sequence
from typing import Literal

import numpy as np

Strategy = Literal["none", "epsilon_greedy", "thompson"]
THOMPSON_NOISE = 0.25
THOMPSON_DRAWS = 256


def explore(
    scores: Sequence[float],
    greedy: int,
    strategy: Strategy,
    *,
    epsilon: float,
    seed: int,
) -> tuple[int, list[float]]:
    """(chosen arm index, probability of every arm) for one exploring choice."""
    n = len(scores)
    if n == 0:
        raise ValueError("explore needs at least one arm")
    if strategy == "none" or n == 1:
        return greedy, [1.0 if j == greedy else 0.0 for j in range(n)]
    if strategy == "epsilon_greedy":
        rng = random.Random(seed)
        chosen = rng.randrange(n) if rng.random() < epsilon else greedy
        base = epsilon / n
        return chosen, [base + (1.0 - epsilon if j == greedy else 0.0) for j in range(n)]
    return _thompson(np.asarray(scores, dtype=np.float64), epsilon=epsilon, seed=seed)


def _thompson(scores: np.ndarray, *, epsilon: float, seed: int) -> tuple[int, list[float]]:
    n = scores.shape[0]
    rng = np.random.Generator(np.random.PCG64(seed))
    spread = float(scores.max() - scores.min())
    scale = THOMPSON_NOISE * (spread if spread > 0 else max(abs(float(scores.max())), 1.0))
    noisy = scores + rng.normal(0.0, scale, (THOMPSON_DRAWS, n))
    wins = np.bincount(np.argmax(noisy, axis=1), minlength=n) / THOMPSON_DRAWS
    probs = (1.0 - epsilon) * wins + epsilon / n
    # Draw 0 is the one used, so the chosen arm won at least once in the estimate.
    chosen = int(rng.integers(n)) if rng.random() < epsilon else int(np.argmax(noisy[0]))
    return chosen, probs.tolist()
