"""Property-based tests (hypothesis) of validation, sessionization and the split.

* validation: kept + quarantined == input, always; every quarantined row has a reason and its raw row;
* sessionization: every event is in exactly one session, a session never spans users or a gap;
* split: every usable basket lands in exactly one split; no input event is at or after the target
  time (nothing from the future); train < val < test in time per user; one `latest` row per user.
"""

import json

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundlerec.data.schema import EVENT_TYPES
from bundlerec.data.sessionize import assign_sessions, build_examples
from bundlerec.data.validate import REASON_COL, normalize_events

ITEMS = [f"i{k}" for k in range(6)]
INDEX = {i: k for k, i in enumerate(ITEMS)}
T0 = 1_767_225_600  # 2026-01-01

event = st.tuples(st.sampled_from(["u1", "u2", "u3"]), st.integers(0, 3 * 86400),
                  st.sampled_from(list(EVENT_TYPES)), st.sampled_from(ITEMS))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _events(rows):
    df = pd.DataFrame(rows, columns=["user_id", "t", "event_type", "item_id"])
    df["event_time"] = pd.to_datetime(df.pop("t") + T0, unit="s", utc=True)
    df["session_id"] = pd.Series(pd.NA, index=df.index, dtype="string")
    return df


@SETTINGS
@given(st.lists(event, min_size=1, max_size=60), st.integers(1, 240))
def test_every_event_in_exactly_one_session(rows, gap_min):
    df = _events(rows)
    df["_ts"] = df["event_time"].astype("datetime64[us, UTC]").astype("int64") / 1e6  # seconds
    df = df.sort_values(["user_id", "_ts"], kind="stable").reset_index(drop=True)
    sess = assign_sessions(df, gap_min * 60.0)
    assert len(sess) == len(df)
    assert (np.diff(sess) >= 0).all() and (np.diff(sess) <= 1).all()  # contiguous ids, one per event
    for s in np.unique(sess):
        part = df[sess == s]
        assert part.user_id.nunique() == 1  # never spans users
        assert (np.diff(part._ts.to_numpy()) <= gap_min * 60.0).all()  # never spans a gap


@SETTINGS
@given(st.lists(event, min_size=1, max_size=80), st.integers(1, 8), st.integers(0, 2), st.integers(1, 2))
def test_split_is_leakage_free_and_exclusive(rows, history_len, val_b, test_b):
    df = _events(rows)
    out = build_examples(df, INDEX, 30.0, history_len, "purchase", val_b, test_b)
    users = sorted(df.user_id.unique())
    latest = out[out.split == "latest"]
    assert sorted(latest.user_id) == users  # exactly one latest row per user
    # every basket (a session with a purchase) is an example or counted as cold (no earlier event)
    ev = df.copy()
    ev["_ts"] = ev["event_time"].astype("datetime64[us, UTC]").astype("int64") / 1e6
    ev = ev.sort_values(["user_id", "_ts"], kind="stable").reset_index(drop=True)
    ev["_sess"] = assign_sessions(ev, 30.0 * 60.0)
    baskets = ev[ev.event_type == "purchase"].groupby(["user_id", "_sess"]).ngroups
    assert out[~out.split.isin(["latest"])].groupby(["user_id", "target_time"]).ngroups == baskets
    cold = out[out.split == "cold"]
    assert all(len(h) == 0 for h in cold.hist_items)
    ex = out[~out.split.isin(["latest", "cold"])]
    assert set(ex.split) <= {"train", "val", "test"}
    for r in ex.itertuples():
        u = df[df.user_id == r.user_id].sort_values("event_time", kind="stable")
        before = u[u.event_time < r.target_time]
        # inputs are the user's last events strictly before the target time: nothing from the future
        assert len(r.hist_items) == min(history_len, len(before)) and len(r.hist_items) >= 1
        assert all(a > 0 for a in r.hist_age_hours)
        assert sorted(r.hist_items) == sorted(before.tail(len(r.hist_items)).item_id.map(INDEX))
        assert len(r.targets) >= 1 and r.n_events == len(u)
    for u, g in ex.groupby("user_id"):
        # a basket (one target time) lands in exactly one split
        assert (g.groupby("target_time").split.nunique() == 1).all()
        t = {s: g[g.split == s].target_time for s in ("train", "val", "test")}
        if len(t["val"]) and len(t["train"]):
            assert t["train"].max() < t["val"].min()
        if len(t["test"]) and len(t["val"]):
            assert t["val"].max() < t["test"].min()
        if len(t["test"]) and len(t["train"]):
            assert t["train"].max() < t["test"].min()
        # every purchase of a kept basket is a target, once: the rows of a basket cover exactly the
        # items bought in that session (recomputed here from the raw events)
        u = df[df.user_id == u].copy()
        u["_ts"] = u["event_time"].astype("datetime64[us, UTC]").astype("int64") / 1e6
        u = u.sort_values("_ts", kind="stable").reset_index(drop=True)
        u["_sess"] = assign_sessions(u, 30.0 * 60.0)
        buys = u[u.event_type == "purchase"]
        for tt, b in g.groupby("target_time"):
            targets = [x for ts in b.targets for x in ts]
            assert len(targets) == len(set(targets))
            sess = buys[buys.event_time == tt]._sess.iloc[0]  # the basket's time is its first purchase
            assert set(targets) == set(buys[buys._sess == sess].item_id.map(INDEX))


cell = st.one_of(st.none(), st.text(max_size=6), st.sampled_from(["", " ", "nan", "-1", "1e400", "2026-01-01"]))
raw_row = st.fixed_dictionaries({
    "event_time": st.one_of(cell, st.sampled_from(["2026-01-01T10:00:00Z", "2099-01-01T00:00:00Z", "1767261900"])),
    "event_type": st.one_of(cell, st.sampled_from(["view", "PURCHASE", "remove_from_cart", "teleport"])),
    "user_id": st.one_of(cell, st.just("u" * 200)),
    "item_id": st.one_of(cell, st.sampled_from(ITEMS)),
    "price": st.one_of(cell, st.sampled_from(["1.5", "-2", "1e12", "inf"])),
})


@SETTINGS
@given(st.lists(raw_row, min_size=1, max_size=40), st.lists(st.integers(0, 39), max_size=10))
def test_validation_keeps_or_quarantines_every_row(rows, repeat):
    rows = rows + [rows[i % len(rows)] for i in repeat]  # some events logged twice
    raw = pd.DataFrame(rows)
    out = normalize_events(raw, {}, {"remove_from_cart": None}, "s", pd.Index(ITEMS),
                           max_time=pd.Timestamp("2027-01-01", tz="UTC"), max_price=1e7)
    assert len(out) == len(raw)  # kept + quarantined == input
    bad = out[REASON_COL].notna()
    kept = out[~bad]
    assert bad.sum() + len(kept) == len(raw)
    assert kept.user_id.notna().all() and kept.item_id.isin(ITEMS).all() and kept.event_time.notna().all()
    assert kept.event_type.isin(EVENT_TYPES).all() and (kept.event_time <= pd.Timestamp("2027-01-01", tz="UTC")).all()
    assert ((kept.price >= 0) & (kept.price <= 1e7) | kept.price.isna()).all()
    assert not kept.duplicated(["user_id", "item_id", "event_type", "event_time", "session_id"]).any()
    for r in out[bad].itertuples():  # the source row is kept verbatim for every quarantined row
        src = json.loads(r.raw)
        assert set(src) == set(raw.columns)


@SETTINGS
@given(st.lists(event, min_size=1, max_size=80), st.integers(1, 8), st.floats(0.05, 0.4), st.floats(0.05, 0.4))
def test_global_time_split_trains_on_nothing_after_the_cutoff(rows, history_len, val_f, test_f):
    """data.split=global_time: one cutoff pair for every user; no training example's target or any
    event of its history, hence no statistic of the training split, is at or after the validation
    cutoff; val lies between the cutoffs, test after the test cutoff."""
    from bundlerec.data.sessionize import global_cutoffs
    from bundlerec.data.statistics import basket_groups, popularity

    df = _events(rows)
    buys = df[df.event_type == "purchase"]
    if buys.empty:
        return
    times = buys["event_time"].astype("datetime64[us, UTC]").astype("int64").to_numpy() / 1e6
    t_val, t_test = global_cutoffs(times, val_f, test_f)
    assert t_val <= t_test
    out = build_examples(df, INDEX, 30.0, history_len, "purchase", 1, 1, cutoffs=(t_val, t_test))
    ts = lambda s: s.astype("datetime64[us, UTC]").astype("int64") / 1e6  # noqa: E731
    # a basket's time is its first purchase; one that spans a cutoff goes to the later split
    assert all(t < t_val for t in ts(out[out.split == "train"].target_time))
    assert all(t < t_test for t in ts(out[out.split == "val"].target_time))
    train = out[out.split == "train"]
    for r in train.itertuples():  # every history event is before the target, so before the cutoff
        t = r.target_time.timestamp()
        assert all(t - a * 3600.0 < t_val for a in r.hist_age_hours)
    # the statistics the model, the baselines and the engine read come from these rows only
    counts = popularity(train, len(INDEX)) if len(train) else np.zeros(len(INDEX))
    after = buys[buys["event_time"].astype("datetime64[us, UTC]").astype("int64") / 1e6 >= t_val]
    before = buys[buys["event_time"].astype("datetime64[us, UTC]").astype("int64") / 1e6 < t_val]
    assert counts.sum() <= len(before) and set(np.flatnonzero(counts)) <= set(before.item_id.map(INDEX))
    assert all(len(g) >= 1 for g in basket_groups(train)) and len(after) + len(before) == len(buys)
