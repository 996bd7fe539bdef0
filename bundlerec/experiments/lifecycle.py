"""Online experiments in the registry: the running experiment is a tag on the registered model,
which every Serve replica polls (no redeploy); promotion on online results moves ``champion``.

    python -m jobs.experiment start --config jobs/configs/demo.yaml experiment.name=rerank-v2
    python -m jobs.experiment status | stop
    python -m jobs.experiment_report --config jobs/configs/demo.yaml --promote

The tag ``bundlerec.experiment`` holds {name, salt, arms: {arm: {model, share}}, control, started};
removing it ends the experiment (replicas go back to the champion alone).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Optional

from bundlerec.config import ExperimentConfig, PromotionRule
from bundlerec.registry.promotion import current_champion, set_alias

log = logging.getLogger(__name__)

TAG = "bundlerec.experiment"


PRICING_TAG = "bundlerec.pricing"
"""The pricing policy promoted onto the champion (JSON; absent: the request's limits alone)."""


def spec_of(cfg: ExperimentConfig) -> dict:
    """The registry form of an experiment (what replicas read); an arm with a pricing policy carries it."""
    return {"name": cfg.name, "salt": cfg.salt or cfg.name, "control": cfg.control,
            "arms": {a: {"model": str(cfg.arms[a]), "share": float(cfg.shares[a]),
                         **({"pricing": dict(cfg.pricing[a])} if cfg.pricing.get(a) else {})} for a in sorted(cfg.arms)}}


def resolve(client, model_name: str, ref: str) -> str:
    """An arm's model reference (alias or version number) -> version number."""
    if ref.isdigit():
        return str(client.get_model_version(model_name, ref).version)
    return str(client.get_model_version_by_alias(model_name, ref).version)


def start(client, model_name: str, cfg: ExperimentConfig) -> dict:
    """Check every arm resolves to a registered version, then publish the experiment."""
    spec = spec_of(cfg)
    for arm, a in spec["arms"].items():
        try:
            a["version"] = resolve(client, model_name, a["model"])
        except Exception as e:
            raise ValueError(f"experiment {cfg.name}: arm {arm!r} names {a['model']!r}, not a version or alias "
                             f"of {model_name}: {e}") from None
    spec["started"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    client.set_registered_model_tag(model_name, TAG, json.dumps(spec, sort_keys=True))
    log.info("experiment %s started on %s: %s", cfg.name, model_name, spec["arms"])
    return spec


class ExperimentSpecError(ValueError):
    """The registry's experiment tag is not a well-formed experiment (anyone with registry write access
    can set it: replicas refuse it rather than trust it)."""


def check_spec(spec: object) -> dict:
    """``spec`` (the tag's JSON) checked as :func:`start` would have written it: the same rules as
    :class:`bundlerec.config.ExperimentConfig`, a salt, and each arm a model reference with a share.
    Raises :class:`ExperimentSpecError` naming what is wrong."""
    try:
        if not isinstance(spec, dict) or not isinstance(spec.get("arms"), dict):
            raise ValueError("not an object with an 'arms' object")
        arms = spec["arms"]
        for a, v in arms.items():
            if not isinstance(v, dict) or not isinstance(v.get("model"), str) or not v["model"]:
                raise ValueError(f"arm {a!r} has no model reference")
            if not isinstance(v.get("share"), (int, float)) or isinstance(v["share"], bool):
                raise ValueError(f"arm {a!r} has no numeric share")
        for k in ("name", "salt", "control"):
            if not isinstance(spec.get(k), str) or not spec[k]:
                raise ValueError(f"no {k!r}")
        ExperimentConfig(name=spec["name"], arms={a: v["model"] for a, v in arms.items()},
                         shares={a: float(v["share"]) for a, v in arms.items()}, control=spec["control"],
                         salt=spec["salt"], pricing={a: v["pricing"] for a, v in arms.items() if "pricing" in v})
    except ValueError as e:
        raise ExperimentSpecError(f"malformed experiment tag {TAG}: {e}") from None
    return spec


def read(client, model_name: str) -> Optional[dict]:
    """The running experiment of ``model_name`` (checked, :func:`check_spec`), or None."""
    raw = client.get_registered_model(model_name).tags.get(TAG)
    if not raw:
        return None
    try:
        spec = json.loads(raw)
    except ValueError:
        raise ExperimentSpecError(f"malformed experiment tag {TAG}: not JSON") from None
    return check_spec(spec)


def read_pricing(client, model_name: str) -> Optional[dict]:
    """The pricing policy promoted onto ``model_name``'s champion (checked), or None."""
    from bundlerec.config import check_price_policy

    raw = client.get_registered_model(model_name).tags.get(PRICING_TAG)
    if not raw:
        return None
    try:
        return check_price_policy(json.loads(raw), f"registry tag {PRICING_TAG}")
    except ValueError as e:
        raise ExperimentSpecError(str(e)) from None


def stop(client, model_name: str) -> Optional[dict]:
    """Remove the experiment tag (a malformed one too); returns what it held."""
    raw = client.get_registered_model(model_name).tags.get(TAG)
    if not raw:
        return None
    try:
        spec = read(client, model_name)
    except ExperimentSpecError as e:
        spec = {"name": None, "malformed": str(e)}
    client.delete_registered_model_tag(model_name, TAG)
    log.info("experiment %s stopped on %s", spec["name"], model_name)
    return spec


def decide(report: dict, rule: PromotionRule, control: str) -> dict:
    """The promotion rule on a report (bundlerec.experiments.analysis.report): the arm to promote, or None,
    with every reason. An arm qualifies when the report's sample ratio is sound, every arm has
    ``min_units`` users, its ``rule.metric`` difference to ``control`` is above 0 at the rule's
    one-sided confidence and no guardrail difference is below 0 at that confidence."""
    reasons: list[str] = []
    if report["srm"]["p_value"] < rule.srm_p:
        reasons.append(f"sample ratio mismatch (p={report['srm']['p_value']:.2g} < {rule.srm_p}): assignment is broken")
    small = {a: m["units"] for a, m in report["arms"].items() if m["units"] < rule.min_units}
    if small:
        reasons.append(f"too few users: {small} (< {rule.min_units})")
    blocked = bool(reasons)
    winners = []
    for arm, diff in report["differences"].items():
        d = diff[rule.metric]
        if d["lower"] <= 0:
            reasons.append(f"{arm}: {rule.metric} not better than {control} at {rule.confidence:.0%} "
                           f"(difference {d['estimate']:+.4g}, one-sided bound {d['lower']:+.4g})")
            continue
        worse = [g for g in rule.guardrails if diff[g]["upper"] < 0]
        if worse:
            reasons.append(f"{arm}: guardrail(s) {worse} worse than {control}")
            continue
        winners.append((d["estimate"], arm))
    promote = max(winners)[1] if winners and not blocked else None
    if promote is None and not reasons:
        reasons.append("no arm qualifies")
    return {"promote": promote, "reasons": reasons, "rule": {"metric": rule.metric, "confidence": rule.confidence,
                                                              "guardrails": list(rule.guardrails),
                                                              "min_units": rule.min_units, "srm_p": rule.srm_p,
                                                              "sequential": rule.sequential, "cuped": rule.cuped}}


def promote(client, model_name: str, spec: dict, report: dict, decision: dict) -> dict:
    """Move ``champion`` to the winning arm's version through the offline path's compare-and-set
    (``set_alias`` + read back): only if the champion is still the control arm's version, i.e. nothing
    else moved it while the experiment ran. The decision and its figures go on the version's tags."""
    arm = decision["promote"]
    out = {"promoted": False, "decision": decision}
    figures = {"experiment": spec["name"], "arm": arm, "decided": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "reasons": decision["reasons"], "differences": report["differences"].get(arm) if arm else None}
    versions = report["versions"]
    for a, v in versions.items():  # every version involved gets its arm's figures
        client.set_model_version_tag(model_name, v, f"online.{spec['name']}",
                                     json.dumps({"arm": a, **report["arms"][a], "decision": arm}, sort_keys=True)[:5000])
    if arm is None:
        return out
    champ = current_champion(client, model_name)
    expected = versions[spec["control"]]
    if champ is None or str(champ.version) != str(expected):
        out["refused"] = f"champion is version {champ.version if champ else None}, not the control arm's {expected}"
        return out
    new = versions[arm]
    client.set_model_version_tag(model_name, new, "promotion", json.dumps(figures, sort_keys=True)[:5000])
    set_alias(client, model_name, "champion", new)
    now = current_champion(client, model_name)
    out.update(promoted=str(now.version) == str(new), champion=str(now.version), previous=str(expected))
    if out["promoted"] and any("pricing" in a for a in spec["arms"].values()):  # an experiment on price policies
        policy = spec["arms"][arm].get("pricing")
        if policy:
            client.set_registered_model_tag(model_name, PRICING_TAG, json.dumps(policy, sort_keys=True))
        elif PRICING_TAG in client.get_registered_model(model_name).tags:
            client.delete_registered_model_tag(model_name, PRICING_TAG)
        out["pricing"] = policy or None
    if out["promoted"] and str(new) != str(expected):
        set_alias(client, model_name, "challenger", expected)
        log.info("experiment %s: champion %s -> %s (%s)", spec["name"], expected, new, arm)
    return out


# ---------------------------------------------------------------- the jobs' bodies
def run_report(cfg, promote_now: bool = False, replay: Optional[dict] = None) -> dict:
    """jobs.experiment_report: read the logs, report, log to the versions' MLflow runs, decide and
    (``promote_now``) apply the decision; a promotion ends the experiment. ``replay`` ({runs,
    look_every, lifts}): the rule measured on these users re-randomized (bundlerec.experiments.sequential.replay)."""
    import os
    import tempfile

    import mlflow
    from mlflow.entities import Metric

    from bundlerec import storage
    from bundlerec.experiments import analysis

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    name, exp = cfg.serve.model_name, cfg.experiment
    spec = read(client, name)
    if spec is None or spec["name"] != exp.name:  # stopped already: the config says what it was
        spec = spec_of(exp)
    imp, fb = analysis.read_logs(cfg.serve.event_log_dir, spec["name"], exp.ray_data_min_mb)
    pre = (analysis.read_pre_period(cfg.serve.event_log_dir, imp, exp.cuped_days, exp.ray_data_min_mb)
           if exp.cuped_days > 0 else None)
    rep = analysis.report(imp, fb, spec, exp.bootstrap, exp.seed, exp.promotion, pre)
    decision = decide(rep, exp.promotion, spec["control"])
    rep["decision"] = decision
    with tempfile.TemporaryDirectory() as tmp:
        js, png = os.path.join(tmp, f"{spec['name']}.json"), os.path.join(tmp, f"{spec['name']}.png")
        with open(js, "w") as f:
            json.dump(rep, f, indent=2, default=float)
        analysis.plot(rep, png)
        report_path = storage.join(cfg.serve.event_log_dir, "reports", f"{spec['name']}.json")
        storage.write_text(report_path, open(js).read())
        if storage.is_uri(report_path):
            import pyarrow.fs as pafs

            pafs.copy_files(png, report_path[:-5] + ".png")
        else:
            import shutil

            shutil.copyfile(png, report_path[:-5] + ".png")
        ts = int(datetime.now(timezone.utc).timestamp() * 1000)
        for arm, version in rep["versions"].items():
            run_id = client.get_model_version(name, version).run_id
            if not run_id:
                continue
            m = rep["arms"][arm]["metrics"]
            metrics = [Metric(f"online.{spec['name']}.{k}", v["estimate"], ts, 0) for k, v in m.items()
                       if v["estimate"] == v["estimate"]]  # NaN (e.g. no bundle answers) is not logged
            metrics.append(Metric(f"online.{spec['name']}.units", rep["arms"][arm]["units"], ts, 0))
            client.log_batch(run_id, metrics=metrics)
            client.log_artifact(run_id, js, f"online/{spec['name']}")
            client.log_artifact(run_id, png, f"online/{spec['name']}")
    out = {"report": rep, "decision": decision, "report_path": report_path,
           "summary": {a: {"units": v["units"], "impressions": v["impressions"],
                           **{k: round(m["estimate"], 4) for k, m in v["metrics"].items()}} for a, v in rep["arms"].items()}}
    if replay:
        from bundlerec.experiments import sequential

        users = sequential.with_pre_period(analysis.per_user(imp, fb, exp.promotion.revenue_cap_quantile)[0], pre)
        out["replay"] = [sequential.replay(users, exp.promotion, replay["runs"], replay["look_every"], lift, exp.seed)
                         for lift in replay["lifts"]]
    if promote_now:
        out["promotion"] = promote(client, name, spec, rep, decision)
        if out["promotion"].get("promoted"):
            stop(client, name)
    return out


def wait_for_experiment(url: str, token: Optional[str], experiment: Optional[str], timeout_s: float = 120.0,
                        agree: int = 8) -> None:
    """Until ``agree`` answers in a row of GET /v1/experiment (any replica) run ``experiment`` (None: no experiment)."""
    import time

    from bundlerec.client import http_json

    deadline, streak = time.time() + timeout_s, 0
    while time.time() < deadline:
        got = (http_json(f"{url}/v1/experiment", token=token)["experiment"] or {}).get("name")
        streak = streak + 1 if got == experiment else 0
        if streak >= agree:
            return
        time.sleep(0.25)
    raise TimeoutError(f"replicas at {url} do not all run experiment {experiment!r} after {timeout_s:.0f}s")


def aa_false_positives(cfg, runs: int, users: int, token: Optional[str], seed: int = 0, concurrency: int = 4,
                       progress=None, tag: Optional[str] = None) -> dict:
    """``runs`` A/A experiments (arms a and b both serve the champion; a new salt and new shoppers
    each), each simulated over HTTP, reported and judged by the promotion rule (not applied)."""
    import dataclasses
    import time

    import mlflow

    from bundlerec.experiments import analysis
    from bundlerec.experiments.simulator import simulate

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    name, rule = cfg.serve.model_name, cfg.experiment.promotion
    stamp = tag or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    results = []
    for r in range(runs):
        exp = dataclasses.replace(cfg.experiment, name=f"aa-{stamp}-{r}", arms={"a": "champion", "b": "champion"},
                                  shares={"a": 0.5, "b": 0.5}, control="a", salt="")
        spec = start(client, name, exp)
        try:
            wait_for_experiment(cfg.serve.url, token, exp.name)
            sim = simulate(cfg.serve.url, cfg.data.output_dir, users, token, seed + 1000 * r, concurrency)
        finally:
            stop(client, name)
        shown = sum(t["impressions"] for t in sim["truth"].values())
        analysis.wait_for_rows(cfg.serve.event_log_dir, exp.name, shown, timeout_s=10 * cfg.serve.event_flush_s + 30)
        imp, fb = analysis.read_logs(cfg.serve.event_log_dir, exp.name, exp.ray_data_min_mb)
        rep = analysis.report(imp, fb, spec, exp.bootstrap, exp.seed + r, rule)
        d = decide(rep, rule, "a")
        results.append({"experiment": exp.name, "promote": d["promote"], "srm_p": rep["srm"]["p_value"],
                        "units": {a: v["units"] for a, v in rep["arms"].items()},
                        rule.metric: rep["differences"]["b"][rule.metric]})
        if progress:
            progress(r + 1, runs, 0.0)
        time.sleep(0.1)
    fp = sum(x["promote"] is not None for x in results)
    return {"runs": runs, "users_per_run": users, "false_positives": fp, "rate": fp / runs,
            "rate_ci95": wilson(fp, runs), "configured_level": round(1 - rule.confidence, 4), "rule": rule.metric,
            "results": results}


def wilson(k: int, n: int, z: float = 1.96) -> list:
    """Wilson score interval of a proportion k/n."""
    import math

    p = k / n
    c = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    return [round(max(0.0, mid - c), 4), round(min(1.0, mid + c), 4)]
