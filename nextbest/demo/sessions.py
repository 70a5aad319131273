"""Events of the demo shop as time-ordered columnar chunks of small integers.

Sessions are generated a fixed-size block at a time (vectorised over the block's
sessions, one step per position in the session), each block from its own seed child,
so the output never depends on how a caller chunks it. Blocks hold sessions in start
order; an event of a later block can never precede the first start of that block, so
sorting (pending + new block) and emitting everything before the next block's first
start merges sessions by time exactly, with memory bounded by a block plus the few
sessions still running across the boundary.
"""

from collections.abc import Iterator

import numpy as np

from nextbest.demo.world import DEVICES, REGIONS, World, stream_rng

EVENT_TYPES = ("view", "add_to_cart", "purchase", "rate", "identify")
VIEW, CART, PURCHASE, RATE, IDENTIFY = range(5)
REFERRERS = ("search", "home", "email", "social", "ads", "recommendation")
SESSION_BLOCK = 4096
# Median gap (ms) before an event of each type, and the spread of the lognormal.
GAP_MEDIAN_MS = np.array([40_000, 25_000, 90_000, 240_000, 20_000], dtype=np.float64)
GAP_SIGMA = 0.9
MAX_GAP_MS = 30 * 60 * 1000
QUANTITY_P = np.array([0.8, 0.15, 0.05])
RATING_P = np.array([0.05, 0.07, 0.15, 0.33, 0.40])
AWAY_FROM_HOME = 0.05
OTHER_DEVICE = 0.2

Cols = dict[str, np.ndarray]
"""sess, pos, type, item (-1), ts (epoch ms), value (0 or 1-5), quantity (0 or n),
referrer (-1 or index), user (-1 if the event carries no user_id), anonymous (bool:
carries anonymous_id), geo, device (indices into REGIONS / DEVICES)."""


def _intents(
    world: World, rng: np.random.Generator, user: np.ndarray, start_ms: np.ndarray
) -> np.ndarray:
    """Each session's intent: a favourite with P(favourite_intent), else another category.
    With `taste_shift_days`, the favourites in the e-th period since the start are the
    user's own shifted by e * (a per-user stride) categories: a deterministic drift."""
    cat, users, cfg = world.catalog, world.users, world.cfg
    m, n_cat = len(user), len(cat.categories)
    fav = users.favourites[user].astype(np.int64)
    if cfg.taste_shift_days is not None and n_cat > 1:
        period = (start_ms - cfg.start_ms) // int(cfg.taste_shift_days * 86_400_000)
        stride = 1 + user.astype(np.int64) % (n_cat - 1)
        fav = np.where(fav >= 0, (fav + (period * stride)[:, None]) % n_cat, fav)
    cum = np.cumsum(users.favourite_w[user], axis=1)
    k = (fav >= 0).sum(axis=1)
    which = np.minimum((rng.random(m)[:, None] > cum).sum(axis=1), k - 1)
    favourite = fav[np.arange(m), which]
    keys = np.log(cat.category_p)[None, :] + rng.gumbel(size=(m, n_cat))
    for j in range(fav.shape[1]):
        rows = np.flatnonzero(fav[:, j] >= 0)
        keys[rows, fav[rows, j]] = -np.inf
    other = keys.argmax(axis=1)
    no_other = ~np.isfinite(keys.max(axis=1))
    pick_fav = (rng.random(m) < cfg.favourite_intent) | no_other
    return np.where(pick_fav, favourite, other)


def _block(world: World, b: int) -> Cols:
    """Events of sessions [b*SESSION_BLOCK, ...) in a position-major flat layout.

    Sessions are sorted longest first, so the cells of position j are the first n_j
    sessions: each step of the funnel walk touches only sessions still running,
    instead of a (sessions x longest session) matrix that is mostly padding.
    """
    cfg, plan, cat, users = world.cfg, world.sessions, world.catalog, world.users
    lo, hi = b * SESSION_BLOCK, min(len(plan.start_ms), (b + 1) * SESSION_BLOCK)
    rng = stream_rng(cfg, 3, b)
    order = np.argsort(-plan.length[lo:hi], kind="stable")
    sess = lo + order
    m = len(sess)
    user = plan.user[sess]
    length = plan.length[sess].astype(np.int64)
    intent = _intents(world, rng, user, plan.start_ms[sess])
    anon = rng.random(m) < cfg.anonymous_rate
    identify = anon & (rng.random(m) < cfg.identify_rate) & (length >= 3)
    id_pos = np.where(
        identify, 1 + (rng.random(m) * np.maximum(length - 2, 1)).astype(np.int64), -1
    )
    geo = np.where(
        rng.random(m) < AWAY_FROM_HOME, rng.integers(0, len(REGIONS), m), users.region[user]
    )
    device = np.where(
        rng.random(m) < OTHER_DEVICE, rng.integers(0, len(DEVICES), m), users.device[user]
    )

    width = int(length[0])
    n_at = np.searchsorted(-length, -np.arange(width), side="left")  # sessions with L > j
    offs = np.concatenate([[0], np.cumsum(n_at)])
    n = int(offs[-1])
    row = np.arange(n) - np.repeat(offs[:-1], n_at)  # session (sorted index) of each cell
    pos = np.repeat(np.arange(width), n_at)

    # Item draws for every cell: mostly the intent category, else a popular category.
    stay = rng.random(n) < cfg.in_intent
    noise = rng.choice(len(cat.categories), size=n, p=cat.category_p)
    item = cat.sample(rng, np.where(stay, intent[row], noise))
    step = rng.random(n)
    quantity_draw = (1 + rng.choice(3, size=n, p=QUANTITY_P)).astype(np.int8)
    jitter = np.exp(GAP_SIGMA * rng.standard_normal(n))
    ts = np.empty(n, dtype=np.int64)
    ts[: n_at[0]] = plan.start_ms[sess]
    kind = np.full(n, VIEW, dtype=np.int8)
    quantity = np.zeros(n, dtype=np.int8)
    for j in range(1, width):
        a, z, p = offs[j], offs[j + 1], offs[j - 1]
        k = z - a
        prev, u = kind[p : p + k], step[a:z]
        nxt = np.full(k, VIEW, dtype=np.int8)
        nxt[(prev == VIEW) & (u < cfg.cart_rate)] = CART
        nxt[(prev == CART) & (u < cfg.purchase_rate)] = PURCHASE
        nxt[(prev == PURCHASE) & (u < cfg.rating_rate)] = RATE
        nxt[id_pos[:k] == j] = IDENTIFY
        kind[a:z] = nxt
        follow = (nxt == CART) | (nxt == PURCHASE) | (nxt == RATE)
        item[a:z] = np.where(follow, item[p : p + k], item[a:z])
        quantity[a:z] = np.where(
            nxt == CART, quantity_draw[a:z], np.where(nxt == PURCHASE, quantity[p : p + k], 0)
        )
        gap = np.clip(GAP_MEDIAN_MS[nxt] * jitter[a:z], 1000, MAX_GAP_MS).astype(np.int64)
        ts[a:z] = ts[p : p + k] + gap
    if cfg.end_ms is not None:  # sessions still running at `end` stop there
        np.minimum(ts, cfg.end_ms, out=ts)
    item[kind == IDENTIFY] = -1

    value = np.where(kind == RATE, 1 + rng.choice(5, size=n, p=RATING_P), 0)
    ref_p = np.where(pos == 0, 0.5, 0.05)
    referrer = np.where(
        (kind == VIEW) & (rng.random(n) < ref_p), rng.integers(0, len(REFERRERS), n), -1
    )
    s_anon, s_identify, s_id_pos = anon[row], identify[row], id_pos[row]
    known = ~s_anon | (s_identify & (pos >= s_id_pos))
    anonymous = s_anon & (~s_identify | (pos <= s_id_pos))
    return {
        "sess": sess[row].astype(np.int64),
        "pos": pos.astype(np.int32),
        "type": kind,
        "item": item,
        "ts": ts,
        "value": value.astype(np.int8),
        "quantity": quantity,
        "referrer": referrer.astype(np.int8),
        "user": np.where(known, user[row], -1).astype(np.int32),
        "anonymous": anonymous,
        "geo": geo[row].astype(np.int8),
        "device": device[row].astype(np.int8),
    }


def _take(cols: Cols, index: np.ndarray | slice) -> Cols:
    return {k: v[index] for k, v in cols.items()}


def _concat(parts: list[Cols]) -> Cols:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def iter_ordered(world: World) -> Iterator[Cols]:
    """Every event once, ordered by (ts, session, position); pieces of varying size."""
    starts = world.sessions.start_ms
    n_blocks = -(-len(starts) // SESSION_BLOCK)
    pending: Cols | None = None
    for b in range(n_blocks):
        block = _block(world, b)
        if pending is not None:
            block = _concat([pending, block])
        block = _take(block, np.lexsort((block["pos"], block["sess"], block["ts"])))
        nxt = (b + 1) * SESSION_BLOCK
        cut = (
            int(np.searchsorted(block["ts"], starts[nxt], side="left"))
            if nxt < len(starts)
            else len(block["ts"])
        )
        if cut:
            yield _take(block, slice(0, cut))
        pending = _take(block, slice(cut, None))


def iter_chunks(world: World, chunk_size: int) -> Iterator[Cols]:
    """`iter_ordered` re-cut into chunks of exactly `chunk_size` (the last may be shorter)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    buffer: list[Cols] = []
    held = 0
    for piece in iter_ordered(world):
        buffer.append(piece)
        held += len(piece["ts"])
        while held >= chunk_size:
            merged = _concat(buffer)
            yield _take(merged, slice(0, chunk_size))
            rest = _take(merged, slice(chunk_size, None))
            buffer, held = [rest], len(rest["ts"])
    if held:
        yield _concat(buffer)
