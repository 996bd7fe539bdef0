"""Loader for the bundlerec_intent format (Amazon sessions split into crowd-annotated bundles).

A directory holds one folder per domain (``electronic/``, ``clothing/``, ``food/``) or is itself one
domain; each folder has ``items, session_item, session_bundle, bundle_item, bundle_intent`` as
``.csv.gz`` (see ../shared/data/bundlerec_intent/README.md). Any directory of that format works:
evaluation never assumes a particular user set. ``user_item`` is deliberately not read: it is the
union of each user's bundle items, so feeding it as history would leak the targets.

Item ids are prefixed with the domain (``food:123``) so domains can share one model and catalog.
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass

import pandas as pd

REQUIRED = ("items", "session_item", "session_bundle", "bundle_item")


@dataclass
class Domain:
    name: str
    items: pd.DataFrame  # item_id, title, category, brand, price, description
    bundles: pd.DataFrame  # bundle_id, session_id, user_id, items (list), intent
    sessions: pd.DataFrame  # session_id, user_id, items (list)

    def subset(self, users: set) -> "Domain":
        """The same domain restricted to ``users`` (all their sessions and bundles)."""
        return Domain(self.name, self.items, self.bundles[self.bundles.user_id.isin(users)].reset_index(drop=True),
                      self.sessions[self.sessions.user_id.isin(users)].reset_index(drop=True))


NOISE_PATHS = ("international shipping", "new arrivals", "shop by designer", "fashion watches")


def _paths(raw: str) -> list[list[str]]:
    """'[[A,B, C,D],[A,E]]' -> [['A', 'B, C', 'D'], ['A', 'E']] (levels split on ',' without a space)."""
    return [[p.strip() for p in re.split(r",(?! )", path) if p.strip()]
            for path in re.split(r"\]\s*,\s*\[", str(raw).strip().strip("[]"))]


def category_and_brand(raw: str) -> tuple[str, str | None]:
    """The most specific real category path of an Amazon item, without its root, and a brand.

    Amazon lists several paths per item; some are not categories: shipping notes ("Shoes &
    Accessories: International Shipping Available"), "New Arrivals", and brand index paths
    ``[Clothing, S, SoftWalk]`` (a single letter, then the brand). The longest remaining path wins
    (ties: the first), with its leaf: ``[[Clothing, Shoes & Jewelry,Women,Shoes,Flats]]`` ->
    ``("Women > Shoes > Flats", None)``."""
    brand, best = None, []
    for path in _paths(raw):
        rest = path[1:]
        if len(rest) == 2 and len(rest[0]) == 1:  # brand index: [root, letter, brand]
            brand = brand or rest[1]
            continue
        if not rest or any(n in " ".join(rest).lower() for n in NOISE_PATHS):
            continue
        if len(rest) > len(best):
            best = rest
    if not best:  # nothing but noise: keep the root ("Electronics")
        first = _paths(raw)[0]
        best = first[:1]
    return " > ".join(best), brand


def domain_dirs(path: str) -> dict[str, str]:
    if all(os.path.exists(os.path.join(path, f"{f}.csv.gz")) for f in REQUIRED):
        return {os.path.basename(os.path.normpath(path)): path}
    out = {d: os.path.join(path, d) for d in sorted(os.listdir(path))
           if all(os.path.exists(os.path.join(path, d, f"{f}.csv.gz")) for f in REQUIRED)}
    if not out:
        raise FileNotFoundError(f"{path}: no bundlerec_intent domain folders (need {', '.join(REQUIRED)} .csv.gz)")
    return out


def load_domain(name: str, path: str) -> Domain:
    r = lambda f: pd.read_csv(os.path.join(path, f"{f}.csv.gz"))  # noqa: E731
    pre = lambda s: name + ":" + s.astype(str)  # noqa: E731
    items = r("items")
    cb = items.categories.map(category_and_brand)
    items = pd.DataFrame({"item_id": pre(items.item_id), "title": items.title.astype(str).map(html.unescape),
                          "category": cb.map(lambda x: x[0]), "brand": cb.map(lambda x: x[1]),
                          "price": float("nan"), "description": items["description"] if "description" in items else pd.NA})
    bi = r("bundle_item")
    bi["item_id"] = pre(bi.item_id)
    sb = r("session_bundle")
    bundles = (bi.groupby("bundle_id").item_id.agg(lambda s: list(dict.fromkeys(s))).rename("items").reset_index()
                 .merge(sb, on="bundle_id", how="left"))
    intent_path = os.path.join(path, "bundle_intent.csv.gz")
    if os.path.exists(intent_path):
        bundles = bundles.merge(pd.read_csv(intent_path), on="bundle_id", how="left")
    else:
        bundles["intent"] = pd.NA
    bundles["bundle_id"] = name + ":" + bundles.bundle_id.astype(str)
    bundles["session_id"] = name + ":" + bundles.session_id.astype(str)
    si = r("session_item")
    si["item_id"] = pre(si.item_id)
    sessions = si.groupby("session_id").item_id.agg(lambda s: list(dict.fromkeys(s))).rename("items").reset_index()
    sessions["session_id"] = name + ":" + sessions.session_id.astype(str)
    # the user of each session (user_session); without it each session counts as its own user
    us_path = os.path.join(path, "user_session.csv.gz")
    owner = (pd.read_csv(us_path).assign(session_id=lambda d: name + ":" + d.session_id.astype(str),
                                          user_id=lambda d: name + ":u" + d.user_id.astype(str))
             .drop_duplicates("session_id").set_index("session_id").user_id if os.path.exists(us_path) else pd.Series(dtype=str))
    for df in (bundles, sessions):
        df["user_id"] = df.session_id.map(owner).fillna(df.session_id)
    known = set(items.item_id)
    bundles = bundles[bundles["items"].map(lambda xs: len(xs) >= 2 and all(x in known for x in xs))]
    return Domain(name, items, bundles.reset_index(drop=True), sessions)


def load(path: str) -> dict[str, Domain]:
    return {name: load_domain(name, p) for name, p in domain_dirs(path).items()}


def split_by_user(src: str, out: str, fold: int = 1, mod: int = 5) -> dict:
    """Write ``out/train`` and ``out/eval`` copies of ``src`` split by user, like the upstream hold-out:
    a user goes to eval iff ``int(sha1(f"{domain}:{user_id}"), 16) % mod == fold`` (with all of their
    sessions and bundles). Use a fold other than the one already held out upstream (0)."""
    import hashlib

    counts = {}
    for name, path in domain_dirs(src).items():
        r = lambda f: pd.read_csv(os.path.join(path, f"{f}.csv.gz"))  # noqa: E731
        us = r("user_session")
        ev_users = {u for u in us.user_id.unique()
                    if int(hashlib.sha1(f"{name}:{u}".encode()).hexdigest(), 16) % mod == fold}
        for side in ("train", "eval"):
            keep_users = (us.user_id.isin(ev_users)) if side == "eval" else ~us.user_id.isin(ev_users)
            sessions = set(us[keep_users].session_id)
            sb = r("session_bundle")
            sb = sb[sb.session_id.isin(sessions)]
            users = set(us[keep_users].user_id)
            tables = {"items": r("items"), "user_session": us[keep_users],
                      "session_item": r("session_item").query("session_id in @sessions"),
                      "session_bundle": sb, "bundle_item": r("bundle_item").query("bundle_id in @sb.bundle_id"),
                      "bundle_intent": r("bundle_intent").query("bundle_id in @sb.bundle_id"),
                      "user_bundle": r("user_bundle").query("user_id in @users"),
                      "user_item": r("user_item").query("user_id in @users")}
            d = os.path.join(out, side, name)
            os.makedirs(d, exist_ok=True)
            for f, df in tables.items():
                df.to_csv(os.path.join(d, f"{f}.csv.gz"), index=False)
            counts[f"{side}/{name}"] = {"users": len(users), "bundles": len(sb)}
    return counts
