"""The online experiment report: per-arm shopper metrics from the Serve app's impression and
feedback logs, with bootstrap intervals over users and the sample-ratio-mismatch check.

    python -m jobs.experiment_report --config jobs/configs/demo.yaml experiment.name=exp-1 [--promote]

Per impression (an answer of /v1/recommendations, /v1/bundles or /v1/bundles/complete): clicked, carted, converted (a
purchase or an accepted bundle), revenue; per bundle answer: bundles accepted and their realized
discount (1 - price paid / list price). Per arm, every metric is a ratio of sums over the arm's
users (ctr = clicked impressions / impressions, revenue_per_impression, bundle_take_rate = accepted
bundles / bundle answers, realized_discount = mean discount of accepted bundles ...). Intervals:
users are resampled (Poisson bootstrap, ``bootstrap`` replicates), since one user's impressions are
not independent; the difference of an arm to control takes independent replicates of both.
Feedback is de-duplicated on (impression_id, event_id, item_id) first, so a repeat sent to two
replicas still counts once, and a shown item bought again on the same answer under another event id
(what the replicas refuse, but could not while the shared keys were unreachable) counts once.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import pandas as pd

from bundlerec import storage
from bundlerec.config import ONLINE_METRICS, PromotionRule

log = logging.getLogger(__name__)

IMPRESSION_COLUMNS = ["impression_id", "event_time", "experiment", "arm", "model_version", "endpoint", "user_id",
                      "bundle_list_prices"]
FEEDBACK_COLUMNS = ["impression_id", "event_id", "item_id", "feedback_type", "revenue", "price", "quantity",
                    "bundle_index", "experiment"]
# metric -> (numerator column, denominator column) of the per-user sums
RATIOS = {"ctr": ("clicked", "impressions"), "add_to_cart_rate": ("carted", "impressions"),
          "conversion": ("converted", "impressions"), "revenue_per_impression": ("revenue", "impressions"),
          "revenue_per_impression_capped": ("revenue_capped", "impressions"),
          "bundle_take_rate": ("accepted", "bundle_impressions"), "realized_discount": ("discount", "accepted")}
assert set(RATIOS) == set(ONLINE_METRICS)


def scan(event_log_dir: str, kind: str, columns: list[str], where, ray_data_min_mb: float) -> pd.DataFrame:
    """The rows of ``<event_log_dir>/<kind>`` (local or object store) for which ``where(field, isin)``
    holds, the filter pushed down to the Parquet reader. Ray Data reads a log of ``ray_data_min_mb`` or
    more (parallel read tasks); a smaller one is read here by Arrow's dataset scanner, since a Ray Data
    read costs seconds of task start-up (12 s against 0.2 s on 150 files of 40 rows: the replicas
    write a file per flush). FileNotFoundError when the folder holds no Parquet file."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    path = storage.join(event_log_dir, kind)
    fs, base = pafs.FileSystem.from_uri(path if storage.is_uri(path) else storage.absolute(path))
    files = [f for f in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
             if f.type == pafs.FileType.File and f.base_name.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"no {kind} logged under {path}")
    if sum(f.size for f in files) >= ray_data_min_mb * 2**20:
        import ray.data
        from ray.data.expressions import col

        return (ray.data.read_parquet(path, file_extensions=["parquet"]).select_columns(columns)
                .filter(expr=where(col, lambda e, v: e.is_in(v))).to_pandas())
    ds = pads.dataset([f.path for f in files], filesystem=fs, format="parquet")
    return ds.to_table(columns=columns, filter=where(pads.field, lambda e, v: e.isin(v))).to_pandas()


def read_logs(event_log_dir: str, experiment: str, ray_data_min_mb: float = 256.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The experiment's rows of ``<event_log_dir>/{impressions,feedback}`` (:func:`scan`); the (small)
    per-user aggregation that follows runs in pandas."""

    def rows_of(kind: str, columns: list[str]) -> pd.DataFrame:
        try:
            return scan(event_log_dir, kind, columns, lambda f, _: f("experiment") == experiment, ray_data_min_mb)
        except FileNotFoundError as e:
            if kind == "feedback":  # no feedback at all yet is a valid (if dull) report
                return pd.DataFrame(columns=columns)
            raise FileNotFoundError(f"{e}") from None

    imp = rows_of("impressions", IMPRESSION_COLUMNS)
    if imp.empty:
        raise ValueError(f"no impressions of experiment {experiment!r} under {event_log_dir}")
    return imp, rows_of("feedback", FEEDBACK_COLUMNS)


def per_user(imp: pd.DataFrame, fb: pd.DataFrame, cap_quantile: float = 0.99) -> tuple[pd.DataFrame, dict]:
    """One row per (arm, user) with the sums every metric is a ratio of; and the log's accounting.
    ``revenue_capped`` is a user's revenue capped at the ``cap_quantile`` of the buyers' revenue over
    every arm (``revenue_cap`` in the accounting): the same cap for every arm, whatever it served."""
    n_raw = len(fb)
    fb = fb.drop_duplicates(["impression_id", "event_id", "item_id"])
    buys = fb.feedback_type.isin(["purchase", "bundle_accept"])  # a shown item is bought once per answer
    fb = fb[~(buys & fb[["impression_id", "item_id"]].where(buys).duplicated())]
    known = fb.impression_id.isin(imp.impression_id)
    accounting = {"feedback_rows": int(n_raw), "duplicate_rows_dropped": int(n_raw - len(fb)),
                  "feedback_without_impression": int((~known).sum())}
    fb = fb[known]
    t = fb.feedback_type
    ev = pd.DataFrame({"impression_id": fb.impression_id,
                       "clicked": (t == "click").astype(float), "carted": (t == "cart").astype(float),
                       "converted": t.isin(["purchase", "bundle_accept"]).astype(float),
                       "revenue": fb.revenue.astype(float)})
    per_imp = ev.groupby("impression_id").agg(clicked=("clicked", "max"), carted=("carted", "max"),
                                             converted=("converted", "max"), revenue=("revenue", "sum"))
    # accepted bundles: the price paid (its item rows) against the list price the answer showed
    acc = fb[t == "bundle_accept"].assign(paid=lambda d: d.price.astype(float))
    acc = acc.groupby(["impression_id", "event_id", "bundle_index"], as_index=False).paid.sum()
    acc = acc.drop_duplicates(["impression_id", "bundle_index"])  # one bundle accepted twice counts once
    lists = imp.set_index("impression_id").bundle_list_prices
    acc["list_price"] = [_at(lists.get(i), int(b)) for i, b in zip(acc.impression_id, acc.bundle_index)]
    acc["discount"] = np.where(acc.list_price > 0, 1 - acc.paid / acc.list_price.where(acc.list_price > 0), np.nan)
    accounting["accepted_bundles_without_list_price"] = int(acc.discount.isna().sum())
    bun = acc.dropna(subset=["discount"]).groupby("impression_id").agg(accepted=("discount", "size"),
                                                                        discount=("discount", "sum"))
    df = imp[["impression_id", "arm", "user_id", "endpoint"]].set_index("impression_id")
    df = df.join(per_imp).join(bun).fillna({"clicked": 0.0, "carted": 0.0, "converted": 0.0, "revenue": 0.0,
                                           "accepted": 0.0, "discount": 0.0})
    df["impressions"] = 1.0
    df["bundle_impressions"] = (df.endpoint == "bundles").astype(float)
    cols = ["impressions", "bundle_impressions", "clicked", "carted", "converted", "revenue", "accepted", "discount"]
    users = df.groupby(["arm", "user_id"], as_index=False)[cols].sum()
    buyers = users.revenue[users.revenue > 0]
    cap = float(buyers.quantile(cap_quantile)) if len(buyers) else float("inf")
    accounting["revenue_cap"] = cap if np.isfinite(cap) else None
    return users.assign(revenue_capped=users.revenue.clip(upper=cap)), accounting


def _at(prices, i: int) -> float:
    try:
        v = prices[i]
        return float(v) if v is not None else np.nan
    except (IndexError, TypeError):
        return np.nan


def replicates(users: pd.DataFrame, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Poisson-bootstrap replicates (n,) of every metric for one arm's users."""
    sums = {c: np.zeros(n) for c in {c for pair in RATIOS.values() for c in pair}}
    x = {c: users[c].to_numpy(float) for c in sums}
    for start in range(0, n, 250):  # (250, users) weight blocks: bounded memory for any user count
        w = rng.poisson(1.0, size=(min(250, n - start), len(users))).astype(np.float32)
        for c in sums:
            sums[c][start:start + len(w)] = w @ x[c]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {m: sums[a] / sums[b] for m, (a, b) in RATIOS.items()}


def read_pre_period(event_log_dir: str, imp: pd.DataFrame, days: float,
                    ray_data_min_mb: float = 256.0) -> Optional[pd.DataFrame]:
    """The experiment's users' per-user sums over the ``days`` before its first impression, from every
    impression logged then (any experiment or none) and its feedback: the CUPED covariates. None when
    nothing was logged before."""
    start = pd.Timestamp(imp.event_time.min())
    units = sorted(set(imp.user_id.dropna().astype(str)))
    lo, hi = (start - pd.Timedelta(days=days)).to_pydatetime(), start.to_pydatetime()
    try:
        pre = scan(event_log_dir, "impressions", IMPRESSION_COLUMNS,
                    lambda f, isin: (f("event_time") < hi) & (f("event_time") >= lo) & isin(f("user_id"), units),
                    ray_data_min_mb)
    except FileNotFoundError:
        return None
    if pre.empty:
        return None
    ids = pre.impression_id.tolist()
    try:
        fb = scan(event_log_dir, "feedback", FEEDBACK_COLUMNS, lambda f, isin: isin(f("impression_id"), ids),
                   ray_data_min_mb)
    except FileNotFoundError:
        fb = pd.DataFrame(columns=FEEDBACK_COLUMNS)
    users, _ = per_user(pre.assign(arm="pre"), fb)
    return users


def ratio(users: pd.DataFrame, metric: str) -> float:
    a, b = RATIOS[metric]
    den = users[b].sum()
    return float(users[a].sum() / den) if den > 0 else float("nan")


def srm(units: dict, shares: dict) -> dict:
    """Sample-ratio mismatch: chi-square of users per arm against the configured shares."""
    from scipy.stats import chisquare

    arms = sorted(shares)
    obs = np.array([units.get(a, 0) for a in arms], float)
    exp = np.array([shares[a] for a in arms], float) * obs.sum()
    p = float(chisquare(obs, exp).pvalue) if obs.sum() > 0 else float("nan")
    return {"observed": dict(zip(arms, obs.astype(int).tolist())), "expected": dict(zip(arms, exp.round(1).tolist())),
            "p_value": p}


def report(imp: pd.DataFrame, fb: pd.DataFrame, spec: dict, bootstrap: int = 2000, seed: int = 0,
           rule: Optional[PromotionRule] = None, pre: Optional[pd.DataFrame] = None) -> dict:
    """The experiment report: per arm (users, impressions, model versions, each metric with its 95 %
    interval), per non-control arm the difference to control (estimate, 95 % bootstrap interval, the
    always-valid interval at the rule's confidence with CUPED on ``pre``, the users' pre-period sums,
    and the bounds ``lower``/``upper`` the promotion rule reads: the always-valid ones when
    ``rule.sequential``, else the one-sided bootstrap quantiles), and the SRM check."""
    from bundlerec.experiments import sequential

    rule = rule or PromotionRule()
    confidence = rule.confidence
    users, accounting = per_user(imp, fb, rule.revenue_cap_quantile)
    users = sequential.with_pre_period(users, pre)
    rng = np.random.default_rng(seed)
    arms, reps = {}, {}
    for arm in sorted(spec["arms"]):
        u = users[users.arm == arm]
        reps[arm] = replicates(u, bootstrap, rng) if len(u) else {m: np.full(bootstrap, np.nan) for m in RATIOS}
        served = imp[imp.arm == arm].model_version.value_counts()
        arms[arm] = {"units": int(len(u)), "impressions": int(u.impressions.sum()) if len(u) else 0,
                     "model_versions": {str(k): int(v) for k, v in served.items()},
                     "metrics": {m: {"estimate": ratio(u, m) if len(u) else float("nan"),
                                     "ci95": _quantiles(reps[arm][m], 0.025, 0.975)} for m in RATIOS}}
    control = spec["control"]
    diffs = {}
    for arm in arms:
        if arm == control:
            continue
        diffs[arm] = {}
        for m in RATIOS:
            d = reps[arm][m] - reps[control][m]
            est = arms[arm]["metrics"][m]["estimate"] - arms[control]["metrics"][m]["estimate"]
            base = arms[control]["metrics"][m]["estimate"]
            lo, hi = _quantiles(d, 1 - confidence, confidence)
            av = sequential.always_valid(users[users.arm == control], users[users.arm == arm], *RATIOS[m],
                                         confidence=confidence, horizon_units=rule.horizon_units, cuped=rule.cuped)
            if rule.sequential:
                lo, hi = av["interval"]
            diffs[arm][m] = {"estimate": est, "ci95": _quantiles(d, 0.025, 0.975), "lower": lo, "upper": hi,
                             "relative": est / base if base else float("nan"), "always_valid": av}
    versions = {a: max(v["model_versions"], key=v["model_versions"].get) for a, v in arms.items() if v["model_versions"]}
    return {"experiment": spec["name"], "control": control, "arms": arms, "differences": diffs, "versions": versions,
            "srm": srm({a: v["units"] for a, v in arms.items()}, {a: spec["arms"][a]["share"] for a in spec["arms"]}),
            "confidence": confidence, "bootstrap": bootstrap,
            "bounds": "always-valid (mSPRT" + (", CUPED" if rule.cuped else "") + ")" if rule.sequential else "bootstrap",
            "pre_period_users": int((users.filter(like=sequential.PRE_PREFIX).sum(axis=1) > 0).sum()) if pre is not None else 0,
            **accounting}


def _quantiles(x: np.ndarray, lo: float, hi: float) -> list:
    x = x[np.isfinite(x)]
    if not len(x):
        return [float("nan"), float("nan")]
    return [float(np.quantile(x, lo)), float(np.quantile(x, hi))]


def plot(rep: dict, path: str) -> Optional[str]:
    """Each metric's estimate and 95 % interval per arm (one panel per metric), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted(rep["arms"])
    fig, axes = plt.subplots(2, 4, figsize=(15, 6))
    for ax, m in zip(axes.flat, RATIOS):
        est = [rep["arms"][a]["metrics"][m]["estimate"] for a in arms]
        ci = np.array([rep["arms"][a]["metrics"][m]["ci95"] for a in arms], float)
        err = np.abs(ci.T - np.array(est, float))
        ax.bar(arms, est, yerr=np.nan_to_num(err), capsize=4,
               color=["#888" if a == rep["control"] else "#2a7" for a in arms])
        ax.set_title(m, fontsize=10)
    for ax in list(axes.flat)[len(RATIOS):]:
        ax.axis("off")
    fig.suptitle(f"experiment {rep['experiment']}: per-arm metrics, 95 % bootstrap intervals over users "
                 f"(SRM p={rep['srm']['p_value']:.3g})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def count_rows(event_log_dir: str, experiment: str, kind: str = "impressions") -> int:
    """Rows of ``experiment`` already in Parquet (a quick look; no Ray)."""
    import pyarrow.dataset as pads

    try:
        ds = pads.dataset(storage.join(event_log_dir, kind) if storage.is_uri(event_log_dir)
                          else storage.absolute(storage.join(event_log_dir, kind)), format="parquet",
                          exclude_invalid_files=True)
    except (FileNotFoundError, OSError):
        return 0
    if not ds.files:
        return 0
    return ds.count_rows(filter=pads.field("experiment") == experiment)


def wait_for_rows(event_log_dir: str, experiment: str, n: int, timeout_s: float = 60.0) -> int:
    """Until the replicas have flushed at least ``n`` impressions of ``experiment`` to Parquet."""
    import time

    deadline = time.time() + timeout_s
    while (got := count_rows(event_log_dir, experiment)) < n:
        if time.time() > deadline:
            raise TimeoutError(f"{got} of {n} impressions of {experiment} in Parquet after {timeout_s:.0f}s")
        time.sleep(0.5)
    return got
