"""The hidden world behind the demo shop: catalog, users and the plan of sessions.

Everything is a compact numpy array (a few bytes per item, user and session) so the
10M-event preset stays small in memory; events themselves are generated later, block
by block, in `nextbest.demo.sessions`. Each part draws from its own child of the seed,
so changing e.g. the number of events does not reshuffle the catalog.
"""

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from nextbest.demo.config import DemoConfig

# name -> (median price, log-sd, nouns); the nouns make readable titles.
CATALOG: dict[str, tuple[float, float, tuple[str, ...]]] = {
    "shoes": (70.0, 0.45, ("running shoes", "sneakers", "sandals", "loafers", "boots")),
    "hiking": (
        90.0,
        0.7,
        ("hiking boots", "backpack", "trekking poles", "tent", "rain jacket", "headlamp"),
    ),
    "kitchen": (
        45.0,
        0.6,
        ("chef knife", "frying pan", "blender", "coffee grinder", "cutting board", "kettle"),
    ),
    "books": (15.0, 0.4, ("novel", "cookbook", "travel guide", "biography", "comic", "poems")),
    "electronics": (
        120.0,
        0.8,
        ("headphones", "smartwatch", "charger", "speaker", "e-reader", "webcam"),
    ),
    "garden": (35.0, 0.6, ("garden hose", "pruning shears", "planter", "seed kit", "lawn chair")),
    "toys": (25.0, 0.5, ("puzzle", "building blocks", "plush bear", "board game", "kite")),
    "beauty": (30.0, 0.5, ("face cream", "shampoo", "lipstick", "perfume", "hair dryer")),
    "sports": (40.0, 0.6, ("yoga mat", "dumbbells", "tennis racket", "football", "bike gloves")),
    "home": (50.0, 0.6, ("lamp", "cushion", "rug", "curtains", "throw blanket", "vase")),
    "fashion": (45.0, 0.5, ("t-shirt", "jeans", "scarf", "jacket", "sunglasses")),
    "music": (35.0, 0.7, ("guitar strings", "vinyl record", "ukulele", "microphone", "capo")),
}
ADJECTIVES = (
    "Trail", "Classic", "Urban", "Pro", "Compact", "Deluxe", "Everyday", "Vintage",
    "Ultra", "Eco", "Summit", "Nordic", "Coastal", "Studio", "Rapid", "Cozy",
)  # fmt: skip
REGIONS = ("eu-west", "eu-central", "us-east", "us-west", "ap-south", "ap-northeast", "sa-east")
REGION_P = np.array([0.22, 0.16, 0.24, 0.14, 0.10, 0.08, 0.06])
DEVICES = ("mobile", "desktop", "tablet")
DEVICE_P = np.array([0.55, 0.35, 0.10])
# Share of sessions starting in each UTC hour: quiet nights, evening peak.
HOUR_P = np.array(
    [2, 1, 1, 1, 1, 2, 3, 4, 5, 5, 5, 5, 6, 6, 5, 5, 5, 6, 7, 8, 8, 7, 5, 3], dtype=float
)
HOUR_P /= HOUR_P.sum()
ZIPF_EXPONENT = 1.0
USER_BLOCK = 1 << 16
MAX_FAVOURITES = 3


def stream_rng(cfg: DemoConfig, part: int, block: int = 0) -> np.random.Generator:
    """An independent, reproducible stream per (seed, part, block)."""
    return np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(part, block)))


def id_width(n: int) -> int:
    return max(5, len(str(max(n - 1, 0))))


@dataclass(frozen=True)
class Catalog:
    categories: tuple[str, ...]
    category_p: np.ndarray  # global popularity of each category (sums to 1)
    item_category: np.ndarray  # int8 per item
    price: np.ndarray  # float64 per item, 2 decimals
    in_stock: np.ndarray  # bool per item
    title_adj: np.ndarray  # indices into ADJECTIVES
    title_noun: np.ndarray  # indices into the category's nouns
    title_num: np.ndarray  # 1..99
    by_category: tuple[np.ndarray, ...]  # item indices of each category, most popular first
    cdf: tuple[np.ndarray, ...]  # Zipf cumulative weights matching `by_category`

    def sample(self, rng: np.random.Generator, category: np.ndarray) -> np.ndarray:
        """One item per entry of `category`, Zipf-popular within its category."""
        out = np.empty(category.shape, dtype=np.int64)
        u = rng.random(category.shape)
        for c in range(len(self.categories)):
            hit = category == c
            if hit.any():
                rank = np.searchsorted(self.cdf[c], u[hit], side="right")
                out[hit] = self.by_category[c][np.minimum(rank, len(self.by_category[c]) - 1)]
        return out

    def title(self, item: int) -> str:
        nouns = CATALOG[self.categories[self.item_category[item]]][2]
        adj = ADJECTIVES[self.title_adj[item]]
        return f"{adj} {nouns[self.title_noun[item]]} {self.title_num[item]}"


def build_catalog(cfg: DemoConfig) -> Catalog:
    rng = stream_rng(cfg, 0)
    names = tuple(CATALOG)[: min(len(CATALOG), cfg.n_items)]
    n_cat = len(names)
    category_p = rng.dirichlet(np.full(n_cat, 4.0))
    counts = 1 + rng.multinomial(cfg.n_items - n_cat, category_p)
    item_category = rng.permutation(np.repeat(np.arange(n_cat, dtype=np.int8), counts))
    medians = np.array([CATALOG[n][0] for n in names])[item_category]
    sigmas = np.array([CATALOG[n][1] for n in names])[item_category]
    price = np.maximum(
        np.round(medians * np.exp(sigmas * rng.standard_normal(cfg.n_items)), 2), 0.99
    )
    in_stock = rng.random(cfg.n_items) < 0.9
    n_nouns = np.array([len(CATALOG[n][2]) for n in names])[item_category]
    title_noun = (rng.random(cfg.n_items) * n_nouns).astype(np.int64)
    title_adj = rng.integers(0, len(ADJECTIVES), cfg.n_items)
    title_num = rng.integers(1, 100, cfg.n_items)
    by_category, cdf = [], []
    for c in range(n_cat):
        members = rng.permutation(np.flatnonzero(item_category == c))
        w = 1.0 / np.arange(1, len(members) + 1) ** ZIPF_EXPONENT
        by_category.append(members)
        cdf.append(np.cumsum(w) / w.sum())
    return Catalog(
        names, category_p, item_category, price, in_stock, title_adj, title_noun, title_num,
        tuple(by_category), tuple(cdf),
    )  # fmt: skip


@dataclass(frozen=True)
class Users:
    favourites: np.ndarray  # int8 (n_users, 3), -1 padded, strongest first
    favourite_w: np.ndarray  # float32 (n_users, 3), rows sum to 1
    region: np.ndarray  # int8 index into REGIONS
    device: np.ndarray  # int8 index into DEVICES, the preferred device
    activity: np.ndarray  # float32 relative number of sessions


def build_users(cfg: DemoConfig, category_p: np.ndarray) -> Users:
    """Sparse long-term tastes: 1-3 favourite categories with Dirichlet weights."""
    n, n_cat = cfg.n_users, len(category_p)
    fav = np.full((n, MAX_FAVOURITES), -1, dtype=np.int8)
    fav_w = np.zeros((n, MAX_FAVOURITES), dtype=np.float32)
    region = np.empty(n, dtype=np.int8)
    device = np.empty(n, dtype=np.int8)
    activity = np.empty(n, dtype=np.float32)
    log_p = np.log(category_p).astype(np.float32)
    for block, lo in enumerate(range(0, n, USER_BLOCK)):
        hi = min(n, lo + USER_BLOCK)
        rng = stream_rng(cfg, 1, block)
        k = np.minimum(rng.choice([1, 2, 3], size=hi - lo, p=[0.35, 0.4, 0.25]), n_cat)
        # Gumbel top-k: k distinct categories, drawn by global category popularity.
        keys = log_p + rng.gumbel(size=(hi - lo, n_cat)).astype(np.float32)
        top = np.argsort(-keys, axis=1)[:, :MAX_FAVOURITES]
        w = rng.gamma(1.0, size=(hi - lo, MAX_FAVOURITES)).astype(np.float32)
        keep = np.arange(MAX_FAVOURITES)[None, : top.shape[1]] < k[:, None]
        w = np.where(keep, w[:, : top.shape[1]], 0.0)
        order = np.argsort(-w, axis=1)
        w = np.take_along_axis(w, order, axis=1)
        top = np.take_along_axis(top, order, axis=1)
        width = top.shape[1]
        fav[lo:hi, :width] = np.where(w > 0, top, -1)
        fav_w[lo:hi, :width] = w / w.sum(axis=1, keepdims=True)
        region[lo:hi] = rng.choice(len(REGIONS), size=hi - lo, p=REGION_P)
        device[lo:hi] = rng.choice(len(DEVICES), size=hi - lo, p=DEVICE_P)
        activity[lo:hi] = rng.lognormal(0.0, 1.0, size=hi - lo)
    return Users(fav, fav_w, region, device, activity)


@dataclass(frozen=True)
class SessionPlan:
    """Sessions in start-time order; session i is the i-th to start."""

    start_ms: np.ndarray  # int64
    user: np.ndarray  # int32 owner (anonymous sessions too: their hidden visitor)
    length: np.ndarray  # int32 number of events; sums to n_events exactly


def build_sessions(cfg: DemoConfig, activity: np.ndarray) -> SessionPlan:
    rng = stream_rng(cfg, 2)
    n_events = cfg.n_events
    if n_events == 0:
        empty = np.empty(0, dtype=np.int64)
        return SessionPlan(empty, empty.astype(np.int32), empty.astype(np.int32))
    n_sess = max(1, round(n_events / cfg.mean_session_events))
    floor = 2 if n_events >= 2 * n_sess else 1
    mean_extra = max(cfg.mean_session_events - floor, 1e-9)
    length = floor - 1 + rng.geometric(1.0 / (mean_extra + 1), size=n_sess)
    length = np.minimum(length, 20 * int(cfg.mean_session_events)).astype(np.int64)
    # Nudge lengths so the total is exactly n_events (sizes match the config).
    while (diff := n_events - int(length.sum())) != 0:
        if diff > 0:
            np.add.at(length, rng.integers(0, n_sess, diff), 1)
        else:
            room = np.flatnonzero(length > floor)
            pick = rng.choice(room, size=min(-diff, len(room)), replace=False)
            length[pick] -= 1
    weight = activity.astype(np.float64)
    p = weight / weight.sum()
    user = rng.choice(len(p), size=n_sess, p=p).astype(np.int32)
    day = rng.integers(0, cfg.days, n_sess)
    hour = rng.choice(24, size=n_sess, p=HOUR_P)
    offset_ms = (day * 86_400 + hour * 3_600) * 1000 + rng.integers(0, 3_600_000, n_sess)
    start = cfg.start_ms + offset_ms
    order = np.argsort(start, kind="stable")
    return SessionPlan(start[order], user[order], length[order].astype(np.int32))


@lru_cache(maxsize=1)
def world_for(cfg: DemoConfig) -> "World":
    """The world of `cfg`, shared by the item, user and event iterators of one run."""
    return World(cfg)


@dataclass(frozen=True)
class World:
    """Catalog, users and session plan of one config, built on first use."""

    cfg: DemoConfig

    @cached_property
    def catalog(self) -> Catalog:
        return build_catalog(self.cfg)

    @cached_property
    def users(self) -> Users:
        return build_users(self.cfg, self.catalog.category_p)

    @cached_property
    def sessions(self) -> SessionPlan:
        return build_sessions(self.cfg, self.users.activity)

    @cached_property
    def item_ids(self) -> np.ndarray:
        w = id_width(self.cfg.n_items)
        return np.strings.add("i", np.strings.zfill(np.arange(self.cfg.n_items).astype("U"), w))

    @cached_property
    def user_ids(self) -> np.ndarray:
        w = id_width(self.cfg.n_users)
        return np.strings.add("u", np.strings.zfill(np.arange(self.cfg.n_users).astype("U"), w))
