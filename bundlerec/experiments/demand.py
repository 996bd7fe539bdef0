"""Prices that learn from the shop's own traffic: :func:`refit_demand` (``jobs.fit_demand``) fits
the demand model of :mod:`bundlerec.pricing.feedback` on the logged offers and their acceptances and
registers it; :func:`measure` (``jobs.bench_demand``) measures that loop in the simulator, where
shoppers' willingness to pay is known (:class:`bundlerec.experiments.simulator.Demand`):

1. the champion (its pricing model transferred from the Steam bundles) serves shoppers with an
   exploring price policy, and the endpoint logs every offer and acceptance;
2. ``jobs.fit_demand`` refits the demand model on those logs (a new version, challenger); with
   ``rounds`` > 1 the refit explores in its turn and is refitted on every round's offers;
3. an oracle version: the champion's export pricing with the true curves;
4. a three-arm experiment (transferred, feedback, oracle; no exploration) on new shoppers: revenue
   per impression per arm with bootstrap intervals over users, and the refit's ratio to the oracle.

    python -m jobs.fit_demand --config <config>
    python -m jobs.bench_demand --config <deployed config> --explore-users 2000 --ab-users 3000

It needs a deployed endpoint on a synthetic prep (the simulator's world) with auth and an event log.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Optional

import numpy as np

from bundlerec.experiments.simulator import Demand, simulate


DEMAND_TAG = "bundlerec.demand"
"""Version tag of a refitted demand model: what it was fitted on and its parameters (JSON)."""


def reprice(cfg, source: str, pricing) -> dict:
    """A copy of the export of ``source`` (an alias or a version of ``serve.model_name``, verified
    against its pinned digest) whose pricing is ``pricing(export_dir)`` (a PricingModel and its
    metadata), re-sealed and registered as a new version with the source's validation evidence (a
    price model changes no ranking): on that tie the champion stays, and the new version becomes
    challenger."""
    import os
    import shutil
    import tempfile

    import mlflow

    from bundlerec.integrity import amend
    from bundlerec.registry.promotion import EXPORT_DIGEST_TAG, export_dir_of, load_verified, register

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)  # models:/ URIs resolve against the global registry
    name, client = cfg.serve.model_name, mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    mv = client.get_model_version(name, source) if source.isdigit() else client.get_model_version_by_alias(name, source)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=f"{tmp}/m")
        rec = load_verified(local, mv.tags.get(EXPORT_DIGEST_TAG))  # the registered export, unaltered
        out = os.path.join(tmp, "export")
        shutil.copytree(export_dir_of(local), out)
        model, meta = pricing(out)
        with amend(out, "export"):
            model.save(out, {**meta, "from_version": str(mv.version)})
        reg = register(out, cfg.data.output_dir, cfg.mlflow.tracking_uri, cfg.mlflow.experiment, model_name=name,
                       history_len=rec.history_len, primary_metric=mv.tags.get("primary_metric", "ndcg@10"), ranks_as=mv)
    return {**reg, "from_version": str(mv.version)}


def refit_demand(cfg, source: str = "champion") -> dict:
    """jobs.fit_demand: the demand model of :mod:`bundlerec.pricing.feedback` fitted on every priced
    bundle offer of ``serve.model_name`` in ``serve.event_log_dir`` (any experiment or none; Ray Data
    reads the logs) and its ``bundle_accept`` feedback, in a new version made from ``source``
    (:func:`reprice`), whose bundles say ``price_source: "feedback"``; an experiment with
    ``arms: {control: champion, treatment: challenger}`` then decides online."""
    import datetime
    import os

    import mlflow
    import pandas as pd

    from bundlerec.experiments import analysis
    from bundlerec.pricing import feedback
    from bundlerec.pricing.demand import PricingModel

    name, logs = cfg.serve.model_name, cfg.serve.event_log_dir
    cols = ["impression_id", "model_name", "endpoint", "bundle_items", "bundle_list_prices", "bundle_prices",
            "bundle_price_propensities"]
    imp = analysis.scan(logs, "impressions", cols, lambda f, _: (f("endpoint") == "bundles") & (f("model_name") == name), 0)
    ids = imp.impression_id.tolist()
    try:
        fb = analysis.scan(logs, "feedback", ["impression_id", "feedback_type", "bundle_index"],
                            lambda f, isin: (f("feedback_type") == "bundle_accept") & isin(f("impression_id"), ids), 0)
    except FileNotFoundError:
        fb = pd.DataFrame(columns=["impression_id", "feedback_type", "bundle_index"])
    fitted: dict = {}

    def pricing(export_dir: str):
        items = pd.read_parquet(os.path.join(export_dir, "items.parquet"), columns=["item_id", "price"])
        prices = {str(i): float(p) for i, p in zip(items.item_id, items.price) if p == p and p >= 0}
        fitted.update(feedback.fit(feedback.offers(imp, fb, prices)))
        meta = {"fitted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(), "event_log_dir": logs,
                **{k: v for k, v in fitted.items() if k not in ("theta", "s", "take_rate", "min_ratio", "features")}}
        return PricingModel(s=fitted["s"], linear={k: fitted[k] for k in ("theta", "take_rate", "min_ratio")}), meta

    reg = reprice(cfg, source, pricing)
    fit = fitted
    mlflow.MlflowClient(cfg.mlflow.tracking_uri).set_model_version_tag(name, reg["version"], DEMAND_TAG, json.dumps(
        {"from_version": reg["from_version"], "n_offers": fit["n_offers"], "n_accepted": fit["n_accepted"],
         "s": round(fit["s"], 6), "theta": [round(t, 6) for t in fit["theta"]]}))
    print(f"[bundlerec] fit-demand: {fit['n_offers']} priced offers ({fit['n_accepted']} accepted, "
          f"{fit['explored_share']:.0%} explored): s {fit['s']:.3f}, theta {[round(t, 3) for t in fit['theta']]}; "
          f"registered {name} v{reg['version']} as {reg['alias']}", flush=True)
    return {"fit": fit, "registered": reg}


def _oracle_version(cfg, demand: Demand, source_version: str) -> str:
    """The source version with the true demand curves as its pricing (:func:`reprice`)."""
    from bundlerec.pricing.demand import PricingModel

    oracle = PricingModel(s=demand.s, linear={"theta": demand.oracle_theta(), "take_rate": [1.0, 1.0, 1.0]})
    return reprice(cfg, source_version, lambda _: (oracle, {"oracle": dataclasses.asdict(demand)}))["version"]


def _intervals(imp, fb, arms: list[str], control: str, boot: int, seed: int) -> dict:
    """Per arm: revenue per impression and bundle take rate with 95 % bootstrap intervals over users;
    each arm's revenue ratio to ``control`` with its interval (independent users per arm)."""
    from bundlerec.experiments import analysis

    users, _ = analysis.per_user(imp, fb)
    rng = np.random.default_rng(seed)
    reps, out = {}, {}
    for a in arms:
        u = users[users.arm == a]
        reps[a] = analysis.replicates(u, boot, rng)
        out[a] = {"users": int(len(u)), **{m: {"estimate": analysis.ratio(u, m),
                                               "interval": [float(x) for x in np.nanquantile(reps[a][m], [0.025, 0.975])]}
                                           for m in ("revenue_per_impression", "bundle_take_rate", "realized_discount")}}
    for a in arms:
        r = reps[a]["revenue_per_impression"] / reps[control]["revenue_per_impression"]
        out[a][f"revenue_ratio_to_{control}"] = {
            "estimate": out[a]["revenue_per_impression"]["estimate"] / out[control]["revenue_per_impression"]["estimate"],
            "interval": [float(x) for x in np.nanquantile(r, [0.025, 0.975])]}
    return out


def _explore(cfg, client, token, version: str, k: int, explore: float, users: int, seed: int, demand: Demand,
             progress) -> dict:
    """Round ``k`` of exploration: ``users`` shoppers meet ``version`` with the pricing policy
    ``explore`` (an experiment whose two arms serve it alike), their offers reach the event log."""
    from bundlerec.experiments.lifecycle import start, stop, wait_for_experiment

    exp = dataclasses.replace(cfg.experiment, name=f"explore-{k}-{int(time.time())}", arms={"a": version, "b": version},
                              shares={"a": 0.5, "b": 0.5}, control="a", salt="",
                              pricing={"a": {"explore": explore}, "b": {"explore": explore}})
    start(client, cfg.serve.model_name, exp)
    try:
        wait_for_experiment(cfg.serve.url, token, exp.name)
        sim = simulate(cfg.serve.url, cfg.data.output_dir, users, token, seed=seed, demand=demand, progress=progress)
    finally:
        stop(client, cfg.serve.model_name)
    time.sleep(3 * cfg.serve.event_flush_s + 1)  # the last offers reach Parquet
    return {**sim, "experiment": exp.name}


def _before_exposure(cfg, client, token, champion: str, explored: str, shifts, width: float, users: int, seed: int,
                     demand: Demand, bootstrap: int, progress) -> dict:
    """Issue 29 §4 in the simulator: each ``shift`` policy's revenue per impression estimated from
    the champion's exploration logs (experiment ``explored``; :mod:`bundlerec.experiments.offpolicy`),
    then measured online: control (the champion's own prices) and one arm per shift, ``users`` new shoppers."""
    from bundlerec.experiments import analysis, offpolicy
    from bundlerec.experiments.lifecycle import start, stop, wait_for_experiment
    from bundlerec.experiments.simulator import World

    name, logs = cfg.serve.model_name, cfg.serve.event_log_dir
    cols = ["impression_id", "arm", "user_id", "endpoint", "bundle_items", "bundle_list_prices", "bundle_prices",
            "bundle_optimal_prices", "bundle_price_propensities"]
    imp = analysis.scan(logs, "impressions", cols, lambda f, _: f("experiment") == explored, cfg.experiment.ray_data_min_mb)
    fb = analysis.scan(logs, "feedback", analysis.FEEDBACK_COLUMNS, lambda f, _: f("experiment") == explored,
                       cfg.experiment.ray_data_min_mb)
    est = offpolicy.estimate(imp, fb, World(cfg.data.output_dir).price, shifts, width, bootstrap, seed)
    arms = {f"shift{k}": float(x) for k, x in enumerate(shifts)}
    exp = dataclasses.replace(cfg.experiment, name=f"offpolicy-{int(time.time())}",
                              arms={"control": champion, **{a: champion for a in arms}},
                              shares={a: 1 / (1 + len(arms)) for a in ["control", *arms]}, control="control", salt="",
                              pricing={a: {"shift": x} for a, x in arms.items()})
    start(client, name, exp)
    try:
        wait_for_experiment(cfg.serve.url, token, exp.name)
        simulate(cfg.serve.url, cfg.data.output_dir, users, token, seed=seed, demand=demand, progress=progress)
    finally:
        stop(client, name)
    time.sleep(3 * cfg.serve.event_flush_s + 1)
    imp2, fb2 = analysis.read_logs(logs, exp.name, cfg.experiment.ray_data_min_mb)
    online = _intervals(imp2, fb2, list(exp.arms), "control", bootstrap, seed)
    out = {"estimated_from": explored, "width": width, "logging": est["logging"], "reward_model": est["reward_model"],
           "online_control": online["control"]["revenue_per_impression"], "policies": {}}
    for a, x in arms.items():
        on = online[a]["revenue_per_impression"]
        e = est[str(x)]
        out["policies"][str(x)] = {**e, "online": on, "users": online[a]["users"],
                                   **{f"{k}_inside_online_interval": bool(on["interval"][0] <= e[k]["estimate"]
                                                                          <= on["interval"][1]) for k in ("ips", "dr")}}
    return out


def measure(cfg, token: Optional[str], demand: Demand, explore_users: int = 2000, ab_users: int = 3000,
            explore: float = 0.15, seed: int = 0, bootstrap: int = 2000, rounds: int = 1, challengers=(),
            challenger_users: int = 4000, progress=print) -> dict:
    """The loop of the module docstring on the deployed endpoint of ``cfg``, with ``rounds`` rounds
    of steps 1-2 (round k explores around round k-1's refit, and each refit pools every round's
    offers: the trust region of :mod:`bundlerec.pricing.feedback` moves one step a round); returns
    each round's fit, the truth the last is judged against (the population elasticity at the oracle
    price of a 2-item bundle) and the three arms' revenue. ``challengers`` (shifts): their off-policy
    estimates from round 1's logs, then an online experiment on ``challenger_users`` shoppers
    (:func:`_before_exposure`)."""
    import mlflow

    from bundlerec.experiments import analysis
    from bundlerec.experiments.lifecycle import start, stop, wait_for_experiment
    from bundlerec.pricing import feedback

    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    name, client, url = cfg.serve.model_name, mlflow.MlflowClient(cfg.mlflow.tracking_uri), cfg.serve.url
    champion = client.get_model_version_by_alias(name, "champion").version
    t0, served, history, explored, before = time.time(), str(champion), [], {}, None
    for k in range(rounds):
        sim = _explore(cfg, client, token, served, k, explore, explore_users, seed + 10 * k, demand, progress)
        explored[str(k)] = sim["truth"]
        if k == 0 and challengers:  # the champion's logs, before any shopper sees a challenger
            before = _before_exposure(cfg, client, token, str(champion), sim["experiment"], challengers, explore,
                                      challenger_users, seed + 2, demand, bootstrap, progress)
        refit = refit_demand(cfg, str(champion))
        history.append({"round": k + 1, "explored": served, "version": refit["registered"]["version"],
                        **{key: refit["fit"][key] for key in ("s", "theta", "take_rate", "take_rate_size", "min_ratio",
                                                              "n_offers", "n_accepted", "explored_share")}})
        served = refit["registered"]["version"]
    fit = refit["fit"]
    oracle = _oracle_version(cfg, demand, str(champion))
    exp = dataclasses.replace(cfg.experiment, name=f"demand-{int(time.time())}",
                              arms={"transferred": str(champion), "feedback": served, "oracle": oracle},
                              shares={"transferred": 1 / 3, "feedback": 1 / 3, "oracle": 1 / 3},
                              control="transferred", salt="", pricing={})
    start(client, name, exp)
    try:
        wait_for_experiment(url, token, exp.name)
        ab = simulate(url, cfg.data.output_dir, ab_users, token, seed=seed + 1, demand=demand, progress=progress)
    finally:
        stop(client, name)
    shown = sum(t["impressions"] for t in ab["truth"].values())
    analysis.wait_for_rows(cfg.serve.event_log_dir, exp.name, shown, timeout_s=10 * cfg.serve.event_flush_s + 30)
    imp, fb = analysis.read_logs(cfg.serve.event_log_dir, exp.name, cfg.experiment.ray_data_min_mb)
    arms = _intervals(imp, fb, list(exp.arms), "oracle", bootstrap, seed)
    r = np.linspace(0.05, 1.0, 1901)
    r_star = demand.optimal_ratio(2)
    pop = demand.population(r, 2)
    truth_el = float(np.gradient(np.log(pop), np.log(r))[np.argmin(np.abs(r - r_star))])
    z = feedback.demand_features([25.0, 25.0])
    fit_el = feedback.elasticity(fit["theta"], fit["s"], z, float(np.log(r_star)))
    return {"demand": dataclasses.asdict(demand), "explore": explore, "explore_users": explore_users, "rounds": rounds,
            "ab_users": ab_users, "seed": seed, "fit": fit, "rounds_fit": history, "oracle_theta": demand.oracle_theta(),
            "versions": {"transferred": str(champion), "feedback": served, "oracle": oracle},
            "elasticity_at_oracle_price": {"truth": truth_el, "fitted": fit_el, "relative_error": fit_el / truth_el - 1},
            "s_relative_error": fit["s"] / demand.s - 1 if demand.spread == 0 else None,
            "oracle_discount_2_items": 1 - r_star, "arms": arms, "explore_truth": explored, "before_exposure": before,
            "seconds": round(time.time() - t0, 1)}
