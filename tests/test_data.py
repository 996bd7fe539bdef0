"""Data layer units: validation reasons, sessionization, leakage-safe split, synthetic data, metrics."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from bundlerec.config import SyntheticConfig
from bundlerec.data.schema import SchemaError
from bundlerec.data.sessionize import build_examples
from bundlerec.data.synthetic import generate
from bundlerec.data.validate import REASON_COL, normalize_events
from bundlerec.metrics import MetricAccumulator, batch_metrics, pad_targets

CATALOG = pd.Index(["a", "b", "c"])


def _raw():
    return pd.DataFrame({
        "event_time": ["2026-01-01T10:00:00Z", "not a time", "2026-01-01 10:05:00 UTC", "1767261900",
                       "2026-01-01T10:10:00Z", "2026-01-01T10:11:00Z", "2026-01-01T10:12:00Z", "2026-01-01T10:13:00Z"],
        "event_type": ["view", "view", "PURCHASE", "teleport", "cart", "view", "view", "remove_from_cart"],
        "user_id": ["u1", "u1", "u1", "u1", None, "u2", "u2", "u2"],
        "item_id": ["a", "b", "c", "a", "a", "zzz", "b", "b"],
        "price": ["1.5", "2", "3", "-4", "1", "1", "-1", "2"],
    })


def test_normalize_events_quarantines_each_reason_exactly():
    out = normalize_events(_raw(), {}, {"remove_from_cart": None}, "s", CATALOG)
    reasons = [None if pd.isna(r) else r for r in out[REASON_COL]]
    assert reasons == [None, "unparseable_time", None, "unknown_event_type", "missing_user_id",
                       "item_not_in_catalog", "negative_price", "ignored_event_type"]
    assert out.loc[2, "event_type"] == "purchase"  # case-normalised
    assert out.loc[2, "event_time"] == pd.Timestamp("2026-01-01 10:05:00", tz="UTC")
    # the raw source row is kept, as JSON, for every quarantined row (nothing lost)
    raw = json.loads(out.loc[1, "raw"])
    assert raw["event_time"] == "not a time" and pd.isna(out.loc[0, "raw"])
    assert len(out) == len(_raw())


def test_column_mapping_and_missing_column_error():
    rees = pd.DataFrame({"event_time": ["2019-10-01 00:00:00 UTC"], "event_type": ["view"], "product_id": [44600062],
                         "category_code": ["electronics.smartphone"], "brand": ["shiseido"], "price": [35.79],
                         "user_id": [541312140], "user_session": ["72d76fde"]})
    out = normalize_events(rees, {}, {}, "s", None)
    assert out.loc[0, "item_id"] == "44600062" and out.loc[0, "session_id"] == "72d76fde"
    assert out.loc[0, "category"] == "electronics.smartphone" and out[REASON_COL].isna().all()
    with pytest.raises(SchemaError, match="data.columns.item_id"):
        normalize_events(rees.drop(columns=["product_id"]), {}, {}, "s", None)


def _events(rows):
    df = pd.DataFrame(rows, columns=["user_id", "t", "event_type", "item_id"])
    df["event_time"] = pd.to_datetime(df.pop("t"), unit="s", utc=True)
    df["session_id"] = pd.NA
    return df


def test_sessionize_split_and_no_future_in_inputs():
    H = 3600
    rows = []
    for b in range(4):  # 4 sessions a day apart, each: view x, view y, purchase y
        t0 = b * 24 * H
        rows += [("u", t0, "view", f"x{b}"), ("u", t0 + 60, "view", f"y{b}"), ("u", t0 + 120, "purchase", f"y{b}")]
    rows += [("v", 0, "view", "x0"), ("v", 10, "purchase", "x0")]  # one basket only
    ev = _events(rows)
    index = {k: i for i, k in enumerate(sorted(ev.item_id.unique()))}
    ex = build_examples(ev, index, gap_minutes=30, history_len=4, target_event="purchase", val_baskets=1, test_baskets=1)
    u = ex[ex.user_id == "u"].set_index("split")
    assert sorted(ex[ex.user_id == "u"].split) == ["latest", "test", "train", "train", "val"]
    assert u.loc["test", "targets"] == [index["y3"]] and u.loc["val", "targets"] == [index["y2"]]
    assert u.loc["latest", "n_sessions"] == 4
    # inputs strictly before the basket: all history ages are > 0 and the target's own purchase is absent
    for _, r in ex[ex.split != "latest"].iterrows():
        assert all(a > 0 for a in r.hist_age_hours)
    assert len(u.loc["test", "hist_items"]) == 4 and u.loc["test", "hist_items"][-1] == index["y3"]  # the view
    v = ex[ex.user_id == "v"]
    assert list(v.split) == ["train", "latest"]  # a single basket is never held out


def test_synthetic_is_deterministic_and_structured(tmp_path):
    cfg = SyntheticConfig(n_users=50, n_items=80, n_events=2000, n_bundles=10, seed=3)
    s1 = generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b")
    a = pd.read_parquet(tmp_path / "a/events")
    b = pd.read_parquet(tmp_path / "b/events")
    pd.testing.assert_frame_equal(a, b)
    assert s1["events"] == len(a) and 1000 < len(a) < 4000
    assert set(a.event_type) == {"view", "click", "cart", "purchase"}
    bundles = pd.read_parquet(tmp_path / "a/bundles.parquet")
    cat = pd.read_parquet(tmp_path / "a/catalog.parquet").set_index("item_id")
    for items in bundles.item_ids:  # planted bundles: complementary categories of one group
        assert 2 <= len(items) <= 4
        assert cat.loc[list(items), "group"].nunique() == 1 and cat.loc[list(items), "category"].nunique() == len(items)


def test_ranking_metrics_by_hand():
    top = torch.tensor([[5, 1, 7, 2]])  # ranked list
    tg = pad_targets([[7, 9]])
    m = batch_metrics(top, tg, [2, 4])
    assert m["recall@2"].item() == 0 and m["hitrate@2"].item() == 0
    assert m["recall@4"].item() == pytest.approx(0.5)
    assert m["mrr@4"].item() == pytest.approx(1 / 3)
    assert m["ndcg@4"].item() == pytest.approx((1 / np.log2(4)) / (1 + 1 / np.log2(3)))
    acc = MetricAccumulator([2], n_items=10)
    acc.update(torch.tensor([[0.0, 3.0, 2.0] + [0.0] * 7]), [[1]])
    r = acc.result()
    assert r["ndcg@2"] == 1.0 and r["coverage@2"] == pytest.approx(0.2)


def test_clock_skew_enormous_values_and_long_ids_are_quarantined():
    raw = pd.DataFrame({"event_time": ["2026-01-01T10:00:00Z", "2099-01-01T00:00:00Z", "2026-01-01T10:00:00Z",
                                       "2026-01-01T10:00:00Z", "2026-01-01T10:00:00Z"],
                        "event_type": ["view"] * 5, "user_id": ["u1", "u1", "u1", "u" * 500, "u1"],
                        "item_id": ["a", "a", "a", "a", "b"], "price": ["1", "1", "1e15", "1", ""]})
    out = normalize_events(raw, {}, {}, "s", CATALOG, max_time=pd.Timestamp("2027-01-01", tz="UTC"), max_price=1e7)
    reasons = [None if pd.isna(r) else r for r in out[REASON_COL]]
    assert reasons == [None, "future_time", "implausible_price", "id_too_long", None]


def test_duplicate_events_are_quarantined_not_double_counted():
    raw = pd.DataFrame({"event_time": ["2026-01-01T10:00:00Z"] * 3 + ["2026-01-01T10:00:01Z"],
                        "event_type": ["view", "view", "cart", "view"], "user_id": ["u1"] * 4,
                        "item_id": ["a", "a", "a", "a"]})
    out = normalize_events(raw, {}, {}, "s", CATALOG)
    reasons = [None if pd.isna(r) else r for r in out[REASON_COL]]
    assert reasons == [None, "duplicate_event", None, None]  # other type / other second: distinct events
    assert json.loads(out.loc[1, "raw"])["item_id"] == "a"


def test_prepared_data_must_have_validation_and_long_enough_histories():
    """Selection never silently falls back on test; a history_len above what prep kept is an error,
    not a knob that does nothing (a sweep's data.history_len)."""
    from bundlerec.data.examples import PrepMismatch, check_prepared

    ok = {"examples": {"train": 10, "val": 3, "test": 3}, "max_history_len": 16}
    check_prepared(ok, 16)
    with pytest.raises(PrepMismatch, match="no validation examples"):
        check_prepared({**ok, "examples": {"train": 10, "val": 0, "test": 3}}, 8)
    with pytest.raises(PrepMismatch, match="max_history_len >= 32"):
        check_prepared(ok, 32)
