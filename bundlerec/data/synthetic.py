"""Synthetic clickstream with planted structure: the embedded default for the demo and tests.

What is planted (and why a popularity baseline cannot find it):

* items belong to categories; categories belong to *intent groups* of complementary categories
  (photography: camera, lens, tripod, memory card, ...);
* ``n_bundles`` ground-truth bundles, each 2-4 items from different categories of one group;
* every user has one or two latent intents (groups); a session picks a bundle of one intent,
  views one or two *anchor* items of it (plus look-alike alternatives and popularity noise), sometimes
  carts an alternative it never buys, and purchases a basket drawn from the bundle, which usually
  includes bundle-mates that were never viewed. Half the purchases happen in a later visit; before
  paying, about a third of the basket is carted. So the carts just before a purchase announce part
  of it at most, and predicting the basket needs "what goes with what I looked at" -- which other
  users' purchases of the same bundles teach (bundles are shared across users).

Deterministic by seed; streams to sharded Parquet files so 10M events never sit in memory at once.

    python -m jobs.generate --out data/synth synthetic.n_events=1000000
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bundlerec.config import SyntheticConfig

log = logging.getLogger(__name__)

# group -> {category: (nouns, base price in USD)}
GROUPS: dict[str, dict[str, tuple[list[str], float]]] = {
    "photography": {"cameras": (["mirrorless camera", "dslr camera", "compact camera"], 650.0),
                    "camera lenses": (["zoom lens", "prime lens", "wide angle lens"], 380.0),
                    "tripods": (["travel tripod", "carbon tripod", "tabletop tripod"], 90.0),
                    "memory cards": (["sd card", "microsd card", "cfexpress card"], 35.0)},
    "running": {"running shoes": (["trail running shoes", "road running shoes", "racing flats"], 120.0),
                "sports socks": (["compression socks", "ankle running socks", "merino socks"], 15.0),
                "fitness trackers": (["gps running watch", "fitness band", "heart rate monitor"], 180.0),
                "hydration": (["running water bottle", "hydration vest", "insulated bottle"], 25.0)},
    "coffee": {"coffee beans": (["espresso roast beans", "single origin beans", "decaf beans"], 18.0),
               "coffee grinders": (["burr grinder", "hand grinder", "blade grinder"], 85.0),
               "coffee brewers": (["french press", "pour over dripper", "moka pot"], 40.0),
               "mugs": (["ceramic mug", "travel mug", "espresso cups set"], 14.0)},
    "gaming": {"game consoles": (["game console", "handheld console", "retro console"], 420.0),
               "controllers": (["wireless controller", "pro controller", "arcade stick"], 60.0),
               "gaming headsets": (["gaming headset", "wireless headset", "noise cancelling headset"], 90.0),
               "video games": (["racing game", "adventure game", "sports game"], 55.0)},
    "baking": {"flour": (["bread flour", "almond flour", "whole wheat flour"], 6.0),
               "stand mixers": (["stand mixer", "hand mixer", "dough mixer"], 260.0),
               "bakeware": (["loaf pan", "baking sheet", "bundt pan"], 22.0),
               "baking tools": (["measuring cups", "silicone spatula", "pastry brush set"], 12.0)},
    "camping": {"tents": (["2 person tent", "backpacking tent", "family tent"], 190.0),
                "sleeping bags": (["down sleeping bag", "synthetic sleeping bag", "summer sleeping bag"], 110.0),
                "camp stoves": (["backpacking stove", "gas camp stove", "wood stove"], 60.0),
                "headlamps": (["led headlamp", "rechargeable headlamp", "red light headlamp"], 30.0)},
    "home office": {"laptops": (["ultrabook laptop", "business laptop", "2 in 1 laptop"], 1100.0),
                    "laptop bags": (["laptop backpack", "laptop sleeve", "messenger bag"], 55.0),
                    "computer mice": (["wireless mouse", "ergonomic mouse", "bluetooth mouse"], 30.0),
                    "usb hubs": (["usb c hub", "docking station", "usb 3 hub"], 45.0)},
    "yoga": {"yoga mats": (["yoga mat", "travel yoga mat", "cork yoga mat"], 45.0),
             "yoga blocks": (["foam yoga block", "cork yoga block", "yoga strap set"], 15.0),
             "leggings": (["high waist leggings", "capri leggings", "running tights"], 50.0),
             "foam rollers": (["foam roller", "massage ball", "vibrating roller"], 30.0)},
}
BRANDS = {
    "photography": ["Lumix", "Optiva", "Kestrel", "Nordlicht"],
    "running": ["Stride", "Peakrun", "Velo", "Asphalt"],
    "coffee": ["Bruhaus", "Crema", "Roastery", "Kaffa"],
    "gaming": ["Pixelon", "Arcadia", "Vortex", "Nimbus"],
    "baking": ["Mehl", "Hearth", "Ovenly", "Crumb"],
    "camping": ["Trailhead", "Summit", "Ember", "Pinecrest"],
    "home office": ["Deskline", "Cortex", "Linkway", "Quanta"],
    "yoga": ["Lotus", "Zenflow", "Asana", "Mudra"],
}
ADJECTIVES = ["classic", "pro", "lite", "ultra", "compact", "premium", "essential", "max", "eco", "plus"]


def make_catalog(cfg: SyntheticConfig, rng: np.random.Generator) -> pd.DataFrame:
    """Items with text (title, category, brand, price) spread evenly over the categories."""
    cats = [(g, c) for g, cs in GROUPS.items() for c in cs]
    rows = []
    for i in range(cfg.n_items):
        g, c = cats[i % len(cats)]
        nouns, base = GROUPS[g][c]
        brand = BRANDS[g][rng.integers(len(BRANDS[g]))]
        noun = nouns[rng.integers(len(nouns))]
        adj = ADJECTIVES[rng.integers(len(ADJECTIVES))]
        title = f"{brand} {adj} {noun} {rng.integers(100, 999)}"
        price = round(float(base * rng.lognormal(0.0, 0.25)), 2)
        rows.append((f"I{i:06d}", title, f"{g}.{c}", brand, price, g))
    df = pd.DataFrame(rows, columns=["item_id", "title", "category", "brand", "price", "group"])
    # Zipf-like popularity within each category (drives views of "alternatives" and noise).
    df["popularity"] = 1.0 / (1.0 + rng.permutation(len(df)) % 25) ** 0.8
    return df


def make_bundles(cfg: SyntheticConfig, catalog: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Planted bundles: 2-4 items from distinct complementary categories of one group."""
    by_cat = {c: d.index.to_numpy() for c, d in catalog.groupby("category")}
    groups = list(GROUPS)
    rows = []
    for b in range(cfg.n_bundles):
        g = groups[b % len(groups)]
        cats = [f"{g}.{c}" for c in GROUPS[g]]
        size = int(rng.integers(2, 5))
        chosen = rng.choice(len(cats), size=size, replace=False)
        items = [int(rng.choice(by_cat[cats[j]])) for j in chosen]
        rows.append((f"B{b:05d}", g, [catalog.item_id.iat[i] for i in items], items))
    return pd.DataFrame(rows, columns=["bundle_id", "group", "item_ids", "_idx"])


def _user_events(uid: str, rng: np.random.Generator, columns: tuple, bundles_by_group: dict,
                 by_cat: dict, pop_p: np.ndarray, n_sessions: int, noise: float, out: list) -> None:
    """``columns``: the catalog's item ids, prices and categories as arrays (converted once, not per
    user: per user it made generation quadratic in users x items)."""
    groups = list(bundles_by_group)
    intents = rng.choice(len(groups), size=int(rng.integers(1, 3)), replace=False)
    # Each user favours a few bundles of their intents (repeat interest), so history predicts.
    t = pd.Timestamp("2026-01-01", tz="UTC").value // 10**9 + int(rng.integers(0, 40 * 86400))
    item_ids, prices, cats = columns
    for s in range(n_sessions):
        g = groups[intents[rng.integers(len(intents))]]
        bundle = bundles_by_group[g][rng.integers(len(bundles_by_group[g]))]
        n_anchor = 1 if len(bundle) <= 2 else int(rng.integers(1, 3))
        anchors = list(rng.permutation(bundle)[:n_anchor])
        session: list[tuple[int, str]] = []
        for a in anchors:
            # browse alternatives in the anchor's category, then the anchor itself
            alts = by_cat[cats[a]]
            for alt in rng.choice(alts, size=int(rng.integers(0, 3)), replace=True):
                session.append((int(alt), "view"))
            session.append((int(a), "view"))
            if rng.random() < 0.7:
                session.append((int(a), "click"))
        n_noise = rng.binomial(6, noise)
        for it in rng.choice(len(item_ids), size=n_noise, p=pop_p):
            session.append((int(it), "view"))
        if rng.random() < 0.5:  # an abandoned cart: an alternative carted and never bought
            session.append((int(rng.choice(by_cat[cats[anchors[0]]])), "cart"))
        rng.shuffle(session)
        basket = [i for i in bundle if rng.random() < 0.8] or [anchors[0]]
        t += int(rng.exponential(3 * 86400)) + 7200  # > session gap between sessions
        for it, et in session:
            t += int(rng.integers(10, 240))
            out.append((t, et, uid, f"{uid}-s{s}", item_ids[it], prices[it], None))
        # The purchase: as in real logs, often a later visit (the browsing session ended without one)
        # and only some of the basket carted first, so the carts right before a purchase announce
        # part of it at most; the bundle-mates were usually never viewed by this user.
        sid = f"{uid}-s{s}"
        if rng.random() < 0.5:
            t += int(rng.exponential(86400)) + 7200
            sid = f"{uid}-s{s}b"
        checkout = [(int(i), "cart") for i in basket if rng.random() < 0.35] + [(int(i), "purchase") for i in basket]
        for it, et in checkout:
            t += int(rng.integers(10, 240))
            out.append((t, et, uid, sid, item_ids[it], prices[it], 1 if et == "purchase" else None))


def generate(cfg: SyntheticConfig, out_dir: str | Path) -> dict:
    """Write ``events/part-*.parquet``, ``catalog.parquet`` and ``bundles.parquet`` under ``out_dir``.

    Returns a summary dict (also written to ``synthetic.json``).
    """
    out = Path(out_dir)
    (out / "events").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    catalog = make_catalog(cfg, rng)
    bundles = make_bundles(cfg, catalog, rng)
    bundles_by_group = {g: list(d._idx) for g, d in bundles.groupby("group")}
    by_cat = {c: d.index.to_numpy() for c, d in catalog.groupby("category")}
    pop_p = catalog.popularity.to_numpy() / catalog.popularity.sum()

    # ~ (avg 2.5 browse + 1.5 noise-ish + cart/purchase ~5) ≈ 9 events per session
    sessions_per_user = max(2, round(cfg.n_events / cfg.n_users / 9.0))
    schema = pa.schema([("event_time", pa.timestamp("s", tz="UTC")), ("event_type", pa.string()),
                        ("user_id", pa.string()), ("session_id", pa.string()), ("item_id", pa.string()),
                        ("price", pa.float64()), ("quantity", pa.int64())])
    rows: list = []
    shard = 0
    total = 0

    def flush() -> None:
        nonlocal rows, shard, total
        if not rows:
            return
        cols = list(zip(*rows))
        table = pa.table([pa.array(cols[0], pa.int64()).cast(pa.timestamp("s", tz="UTC"))]
                         + [pa.array(c, schema.field(i + 1).type) for i, c in enumerate(cols[1:])],
                         schema=schema)
        pq.write_table(table, out / "events" / f"part-{shard:05d}.parquet", compression="zstd")
        total += len(rows)
        shard += 1
        rows = []

    columns = (catalog.item_id.to_numpy(), catalog.price.to_numpy(), catalog.category.to_numpy())
    for u in range(cfg.n_users):
        n_sessions = max(1, int(rng.poisson(sessions_per_user)))
        _user_events(f"U{u:07d}", rng, columns, bundles_by_group, by_cat, pop_p, n_sessions, cfg.noise, rows)
        if len(rows) >= cfg.events_per_shard:
            flush()
            log.info("synthetic: %d events written (%d shards)", total, shard)
    flush()

    catalog.drop(columns=["popularity"]).to_parquet(out / "catalog.parquet", index=False)
    bundles.drop(columns=["_idx"]).to_parquet(out / "bundles.parquet", index=False)
    summary = {"events": total, "shards": shard, "users": cfg.n_users, "items": cfg.n_items,
               "bundles": cfg.n_bundles, "seed": cfg.seed, "path": str(out)}
    (out / "synthetic.json").write_text(json.dumps(summary, indent=2))
    return summary
