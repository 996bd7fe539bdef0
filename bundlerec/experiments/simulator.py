"""Simulated shoppers against the live endpoint: the generator's planted world as ground truth.

    python -m jobs.simulate_traffic --config jobs/configs/demo.yaml --users 2000

No real shoppers are here, so these play them, over HTTP, as a browser would. Their true
preferences are the synthetic generator's own (bundlerec.data.synthetic, read back from the prep
snapshot's ``raw/`` folder): each shopper has one or two intent groups and shops for one planted
bundle of them, viewing (and often clicking) one or two of its items -- the live session sent to
``/v1/recommendations`` and ``/v1/bundles``. The response model, known exactly:

* a shown item is relevant 1.0 if it completes the planted bundle, 0.3 if it is of an intent group,
  else 0.03; it is clicked with probability ``0.7 x relevance / (1 + rank) ** 0.5``;
* a clicked item is carted with probability 0.5 x relevance, a carted one bought with probability
  ``1 / (1 + price / (2 x the shopper's price reference))`` -- price sensitivity;
* a shown bundle is accepted with probability ``0.6 x mean relevance x (0.4 + 3 x discount) / (1 + j)``
  (capped at 1; j = its position) at its offered price; or, given a :class:`Demand` (known
  willingness-to-pay curves), ``min(1, 0.6 x mean relevance / (1 + j)) x P(WTP >= price)``.

Every shopper draws from its own generator (seed, shopper index) and sends its own session id, so a
run is deterministic whatever the concurrency. Some feedback is sent twice on purpose (the
endpoint must count it once). The returned ``truth`` counts what was shown and done per arm, for a
test to hold the report's figures against.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Optional

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Demand:
    """Known willingness to pay for a bundle of n items with list price L: ``L * exp(mu_i + eps)``,
    ``eps ~ Logistic(0, s)``, ``mu_i = mu + per_item * log(n / 2) + spread * z_i`` with z_i ~ N(0, 1)
    one shopper's own (heterogeneous shoppers when ``spread`` > 0). In the refitted demand model's
    coordinates (bundlerec.pricing.feedback) the truth is theta = (mu, 0, per_item) and s."""

    mu: float = -0.1
    s: float = 0.15
    per_item: float = -0.1
    spread: float = 0.0

    def buys(self, ratio: float, n: int, z: float) -> float:
        """P(WTP >= price) at ``ratio`` = price / L for a shopper with trait ``z``."""
        m = self.mu + self.per_item * np.log(max(n, 1) / 2) + self.spread * z
        return float(1.0 / (1.0 + np.exp(-(m - np.log(max(ratio, 1e-9))) / self.s)))

    def population(self, ratio: np.ndarray, n: int, draws: int = 4001) -> np.ndarray:
        """P(WTP >= price) over all shoppers (the mixture over z), at each of ``ratio``."""
        from scipy.special import erfinv

        z = np.sqrt(2) * erfinv(np.linspace(-1, 1, draws + 2)[1:-1])  # evenly spaced N(0, 1) quantiles
        m = self.mu + self.per_item * np.log(max(n, 1) / 2) + self.spread * z
        return (1.0 / (1.0 + np.exp(-(m[None, :] - np.log(np.asarray(ratio, float))[:, None]) / self.s))).mean(1)

    def optimal_ratio(self, n: int, lo: float = 0.0) -> float:
        """The revenue-optimal price / L of a bundle of ``n`` items for the whole population (no
        personal prices), at least ``lo``."""
        r = np.linspace(max(lo, 0.05), 1.0, 1901)
        return float(r[np.argmax(r * self.population(r, n))])

    def oracle_theta(self) -> list[float]:
        """theta of the demand model (with this ``s``) whose optimum is the population optimum at 2
        and at 4 items (exact for homogeneous shoppers, where it is (mu, 0, per_item))."""
        off = self.s * np.log((1 - self.s) / self.s)  # log r* = theta . z - off under the model
        a, b = (np.log(self.optimal_ratio(n)) + off for n in (2, 4))
        return [float(a), 0.0, float((b - a) / np.log(2))]


class World:
    """The generator's planted structure for the served catalog."""

    def __init__(self, prep_dir: str):
        from bundlerec.data.snapshot import data_root
        from bundlerec import storage

        raw = storage.join(data_root(prep_dir), "raw")
        try:
            catalog = pd.read_parquet(storage.join(raw, "catalog.parquet"))
            bundles = pd.read_parquet(storage.join(raw, "bundles.parquet"))
        except (FileNotFoundError, OSError) as e:
            raise ValueError(f"{prep_dir}: simulated shoppers need a synthetic prep (its raw/ catalog and planted "
                             f"bundles are their true preferences): {e}") from None
        self.items = catalog.item_id.astype(str).tolist()
        self.group = dict(zip(catalog.item_id.astype(str), catalog.group))
        self.price = dict(zip(catalog.item_id.astype(str), catalog.price.astype(float)))
        self.bundles_by_group = {g: [list(map(str, b)) for b in d.item_ids] for g, d in bundles.groupby("group")}
        self.groups = sorted(self.bundles_by_group)


def _post(url: str, body: dict, token: Optional[str], timeout: float = 60.0, patience_s: float = 120.0) -> tuple[int, dict]:
    """POST as a shop's client would: retry a 503 (shed load) after its Retry-After, and a 5xx or a
    broken connection (a replica that died mid-request) after a pause, for up to ``patience_s``."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    deadline = time.time() + patience_s
    while True:
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code < 500 or time.time() > deadline:
                return e.code, json.loads(e.read() or b"{}")
            time.sleep(float(e.headers.get("Retry-After") or 1) * (0.5 + np.random.random()))
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.time() > deadline:
                raise
            time.sleep(1)


def _shopper(i: int, world: World, url: str, token: Optional[str], seed: int, duplicate_rate: float,
             visit: int = 0, demand: Optional[Demand] = None) -> dict:
    trait = float(np.random.default_rng([seed, i, 7]).normal()) if demand else 0.0  # the shopper's own WTP
    rng = np.random.default_rng([seed, i])
    intents = rng.choice(len(world.groups), size=int(rng.integers(1, 3)), replace=False)
    groups = {world.groups[g] for g in intents}
    g = world.groups[intents[rng.integers(len(intents))]]
    bundle = world.bundles_by_group[g][rng.integers(len(world.bundles_by_group[g]))]
    anchors = list(rng.permutation(bundle)[:1 if len(bundle) <= 2 else int(rng.integers(1, 3))])
    price_ref = float(np.mean([world.price[x] for x in bundle])) * float(rng.lognormal(0, 0.3))
    if visit:  # the same shopper (intents, planted bundle, first items, price reference) on another visit
        rng = np.random.default_rng([seed, i, visit])
    now = datetime.now(timezone.utc)
    events = []
    for a in anchors:
        events.append({"item_id": a, "event_type": "view", "event_time": (now - timedelta(minutes=9)).isoformat()})
        if rng.random() < 0.7:
            events.append({"item_id": a, "event_type": "click", "event_time": (now - timedelta(minutes=8)).isoformat()})
    wanted = set(bundle) - set(anchors)

    def relevance(x: str) -> float:
        return 1.0 if x in wanted else 0.3 if world.group.get(x) in groups else 0.03

    session = f"sim-{seed}-{i}"
    out = {"ids": [], "arms": [], "impressions": 0, "clicks": 0, "carts": 0, "purchases": 0, "revenue": 0.0, "accepted": 0,
           "feedback": 0, "duplicates_sent": 0}
    feedback: list[dict] = []
    code, rec = _post(f"{url}/v1/recommendations", {"events": events, "k": 10, "session_id": session}, token)
    if code != 200:
        raise RuntimeError(f"/v1/recommendations answered {code}: {rec}")
    code, bun = _post(f"{url}/v1/bundles", {"events": events, "n": 3, "max_size": 4, "session_id": session}, token)
    if code != 200:
        raise RuntimeError(f"/v1/bundles answered {code}: {bun}")
    for answer in (rec, bun):
        out["arms"].append((answer.get("experiment") or {}).get("arm"))
        out["ids"].append(answer["impression_id"])
        out["impressions"] += 1
    n = 0
    for r, item in enumerate(rec["items"]):
        x, rel = item["item_id"], relevance(item["item_id"])
        if rng.random() >= 0.7 * rel / (1 + r) ** 0.5:
            continue
        n += 1
        feedback.append({"impression_id": rec["impression_id"], "event_id": f"e{n}", "type": "click", "item_id": x})
        out["clicks"] += 1
        if rng.random() >= 0.5 * rel:
            continue
        n += 1
        feedback.append({"impression_id": rec["impression_id"], "event_id": f"e{n}", "type": "cart", "item_id": x})
        out["carts"] += 1
        if rng.random() < 1 / (1 + world.price[x] / (2 * price_ref)):
            n += 1
            feedback.append({"impression_id": rec["impression_id"], "event_id": f"e{n}", "type": "purchase",
                             "item_id": x, "price": world.price[x]})
            out["purchases"] += 1
            out["revenue"] += world.price[x]
    for j, b in enumerate(bun["bundles"]):
        items = [it["item_id"] for it in b["items"]]
        value = float(np.mean([relevance(x) for x in items]))
        price = b.get("bundle_price") or b.get("list_price") or sum(world.price[x] for x in items)
        discount = float(b.get("discount") or 0.0)
        if demand is not None:
            listed = sum(world.price[x] for x in items)
            p_accept = min(1.0, 0.6 * value / (1 + j)) * demand.buys(float(price) / listed, len(items), trait)
        else:
            p_accept = min(1.0, 0.6 * value * (0.4 + 3 * discount) / (1 + j))
        if rng.random() < p_accept:
            n += 1
            feedback.append({"impression_id": bun["impression_id"], "event_id": f"e{n}", "type": "bundle_accept",
                             "bundle_index": j, "items": items, "price": round(float(price), 2)})
            out["accepted"] += 1
            out["revenue"] += round(float(price), 2)
    if feedback:
        code, body = _post(f"{url}/v1/feedback", {"events": feedback}, token)
        # accepted + duplicates: a retry after a replica died may find part of it recorded already
        if code != 200 or body["accepted"] + body["duplicates"] != len(feedback):
            raise RuntimeError(f"/v1/feedback answered {code}: {body}")
        out["feedback"] = len(feedback)
        if rng.random() < duplicate_rate:  # a client retry: must be counted once
            code, body = _post(f"{url}/v1/feedback", {"events": feedback}, token)
            if code != 200 or body["accepted"] + body["duplicates"] != len(feedback):
                raise RuntimeError(f"a repeated /v1/feedback answered {code}: {body}")
            out["duplicates_sent"] = len(feedback)
    return out


def simulate(url: str, prep_dir: str, users: int, token: Optional[str] = None, seed: int = 0,
             concurrency: int = 4, duplicate_rate: float = 0.05, progress=None, collect_ids: bool = False,
             visit: int = 0, demand: Optional[Demand] = None) -> dict:
    """Play ``users`` shoppers against the endpoint at ``url``; returns the truth per arm (and, with
    ``collect_ids``, every impression id the shoppers received). ``visit`` > 0 brings the same
    shoppers (same seed: same session ids, intents, planted bundle and price reference) back with new
    choices: visit 0 before an experiment starts is the pre-period its report's CUPED reads.
    ``demand``: bundles are accepted by known willingness-to-pay curves (:class:`Demand`)."""
    world = World(prep_dir)
    req = urllib.request.Request(f"{url}/v1/model", headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        n_served = json.loads(r.read())["n_items"]
    if n_served != len(world.items):  # the shoppers' world must be the served model's catalog
        raise ValueError(f"{url} serves {n_served} items, the prep snapshot at {prep_dir} holds {len(world.items)}: "
                         "point data.output_dir at the served model's prep")
    truth: dict = defaultdict(lambda: defaultdict(float))
    t0, done, ids = time.time(), 0, []
    with ThreadPoolExecutor(concurrency) as pool:
        for r in pool.map(lambda i: _shopper(i, world, url, token, seed, duplicate_rate, visit, demand), range(users)):
            arm = r["arms"][0] if len(set(r["arms"])) == 1 else "MIXED"  # sticky: both answers in one arm
            t = truth[str(arm)]
            t["users"] += 1
            for k in ("impressions", "clicks", "carts", "purchases", "revenue", "accepted", "feedback", "duplicates_sent"):
                t[k] += r[k]
            ids.extend(r["ids"])
            done += 1
            if progress and (done % max(1, users // 10) == 0 or done == users):
                progress(done, users, time.time() - t0)
    out = {"users": users, "seed": seed, "visit": visit, "seconds": round(time.time() - t0, 1),
           "truth": {a: dict(v) for a, v in sorted(truth.items())}}
    return {**out, "impression_ids": ids} if collect_ids else out
