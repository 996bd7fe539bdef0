"""The Steam bundles (``steam_bundles`` format: list and final prices, discounts, item names,
genres, sellers) as pricing data, and the pricing model fitted on all of them."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from bundlerec.pricing.demand import PricingModel
from bundlerec.pricing.features import SELLER_KEYS, bundle_features, design

def load_steam(data_dir: str) -> tuple[pd.DataFrame, np.ndarray, list, dict]:
    """Steam bundles of ``data_dir``: (bundles, their BUNDLE_FEATURES, item-id lists, sellers of
    the items from ``games.jsonl.gz`` when present: item id -> {"publisher", "developer"})."""
    import gzip
    import json

    if not os.path.exists(os.path.join(data_dir, "bundles.csv.gz")):
        raise FileNotFoundError(f"pricing.data_dir={data_dir!r} has no bundles.csv.gz (the steam_bundles format); "
                                f"point it at a steam_bundles folder (datasets/steam_bundles) or set pricing.data_dir=null")
    b = pd.read_csv(f"{data_dir}/bundles.csv.gz")
    it = pd.read_csv(f"{data_dir}/bundle_items.csv.gz")
    groups = {k: g for k, g in it.groupby("bundle_id")}
    b = b[b.bundle_id.isin(groups) & (b.bundle_price_usd > 0)].reset_index(drop=True)
    X = np.stack([bundle_features(groups[i].item_price_usd.fillna(0).to_numpy(), groups[i].item_name.astype(str).tolist(),
                                  groups[i].genre.fillna("").astype(str).tolist(), name)
                  for i, name in zip(b.bundle_id, b.bundle_name)])
    sets = [groups[i].item_id.astype(str).tolist() for i in b.bundle_id]
    used, sellers = {x for s_ in sets for x in s_}, {}
    games = f"{data_dir}/games.jsonl.gz"
    if os.path.exists(games):
        with gzip.open(games, "rt") as f:
            for line in f:
                g = json.loads(line)
                if str(g.get("id")) in used:
                    sellers[str(g["id"])] = {k: g.get(k) for k in SELLER_KEYS}
    return b, X, sets, sellers


def fit_steam(data_dir: str, s: float = PricingModel.s, seed: int = 0) -> tuple[PricingModel, dict]:
    """The pricing model fitted on every Steam bundle of ``data_dir``, with its fit metadata (data,
    date, bundles); the price stage (:func:`bundlerec.price.attach_pricing`) adds the
    cross-validated figures."""
    import datetime

    b, X, sets, sellers = load_steam(data_dir)
    d = b.bundle_discount.to_numpy(dtype=float)
    every = np.arange(len(b))
    ctx, F = design(X, sets, d, sellers, every, every)
    model = PricingModel(s=s, seed=seed, context=ctx).fit(F, d)
    meta = {"data_dir": os.path.abspath(data_dir), "fitted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "n_bundles": int(len(b))}
    return model, meta
