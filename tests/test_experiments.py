"""Online experiments: assignment, impression ids, the durable event log, the report and the
promotion rule (fast, no services), then the whole loop over real HTTP against the Serve app
(`test_an_experiment_over_http_finds_the_better_arm_and_promotes_it`)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from bundlerec.config import ExperimentConfig, PromotionRule
from bundlerec.experiments import analysis
from bundlerec.experiments.lifecycle import decide, spec_of
from bundlerec.experiments.event_log import EventLog, OnlineLog, wal_dir_for
from bundlerec.experiments.assignment import ImpressionSigner, assign, bucket
from tests.support import ROOT


# ---------------------------------------------------------------- assignment and impression ids
def test_assignment_is_sticky_deterministic_and_follows_the_shares():
    spec = spec_of(ExperimentConfig(name="e1", arms={"a": "champion", "b": "challenger", "c": "3"},
                                    shares={"a": 0.5, "b": 0.3, "c": 0.2}, control="a"))
    units = [f"u{i}" for i in range(20_000)]
    arms = [assign(spec, u) for u in units]
    assert arms == [assign(spec, u) for u in units]  # sticky: the same unit, the same arm
    share = pd.Series(arms).value_counts(normalize=True)
    assert abs(share["a"] - 0.5) < 0.015 and abs(share["b"] - 0.3) < 0.015 and abs(share["c"] - 0.2) < 0.015
    other = [assign({**spec, "salt": "e2"}, u) for u in units]  # a new salt reshuffles
    assert abs(np.mean([x == y for x, y in zip(arms, other)]) - (.5**2 + .3**2 + .2**2)) < 0.02  # independent
    assert 0 <= bucket("s", "u") < 1


def test_impression_ids_are_signed_and_any_replica_can_check_them():
    a, b = ImpressionSigner(b"k" * 32), ImpressionSigner(b"k" * 32)
    iid, fields = a.issue("u1", "e1", "treatment", "3", "bundles", [["I1", "I2"], ["I3", "I4", "I5"]])
    assert b.check(iid) == fields and fields["a"] == "treatment" and fields["v"] == "3"
    payload, _, tag = iid.partition(".")
    forged = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + tag
    for bad in (forged, payload + ".x", "nonsense", iid + "x"):
        with pytest.raises(ValueError):
            b.check(bad)
    with pytest.raises(ValueError):
        ImpressionSigner(b"other-key" * 4).check(iid)
    # any character after (or before) the dot is a refusal, never an error of the comparison
    for bad in (payload + ".é" + tag, payload + "." + tag[:-1] + "\u00e9", "\ud800." + tag, payload + ".\ud800"):
        with pytest.raises(ValueError):
            b.check(bad)
    # the longest user id the API takes, in any script, with the most items an answer shows (100),
    # gives an id POST /v1/feedback accepts
    from bundlerec.serving.schemas import FeedbackEvent, RecommendationRequest

    limit = RecommendationRequest.model_fields["user_id"].metadata
    longest = next(m.max_length for m in limit if hasattr(m, "max_length"))
    id_limit = next(m.max_length for m in FeedbackEvent.model_fields["impression_id"].metadata if hasattr(m, "max_length"))
    for ch in ("a", "\u4e2d", "\U0001f600"):
        iid, fields = a.issue(ch * longest, "experiment-name", "treatment", "123", "recommendations",
                              [[f"I{j:07d}" for j in range(100)]])
        assert len(iid) <= id_limit and b.check(iid) == fields


def test_feedback_must_match_what_the_answer_showed():
    """Stateless checks any replica makes against the signed impression: the item was shown (its
    keyed tag), bundle_accept names a bundle of a bundles answer with exactly its items, the time is
    not before the answer, the answer is not expired, the price is within 10x the catalog's; an id
    that does not say what was shown is refused."""
    import base64

    from bundlerec.experiments.assignment import IMPRESSION_TTL_S, bound_feedback
    from bundlerec.serving.schemas import FeedbackEvent

    signer = ImpressionSigner(b"k" * 32)
    rec_id, rec = signer.issue("u1", None, None, "3", "recommendations", [["I1", "I2", "I3"]])
    bun_id, bun = signer.issue("u1", None, None, "3", "bundles", [["I1", "I2"], ["I3", "I4", "I5"]])
    now = rec["t"] + 1_000_000

    def ev(imp_id, **kw):
        return FeedbackEvent(impression_id=imp_id, event_id="e1", **kw)

    ok = [(rec, ev(rec_id, type="click", item_id="I2")), (bun, ev(bun_id, type="purchase", item_id="I4", price=12.0)),
          (bun, ev(bun_id, type="bundle_accept", bundle_index=1, items=["I5", "I3", "I4"], price=25.0))]
    for imp, e in ok:
        assert bound_feedback(signer, imp, e, [10.0] * len(e.items or [e.item_id]), now) is None, e
    bad = {"item_id": (rec, ev(rec_id, type="click", item_id="I9")),
           "type": (rec, ev(rec_id, type="bundle_accept", bundle_index=0, items=["I1", "I2"], price=5.0)),
           "bundle_index": (bun, ev(bun_id, type="bundle_accept", bundle_index=2, items=["I1", "I2"], price=5.0)),
           "items": (bun, ev(bun_id, type="bundle_accept", bundle_index=0, items=["I1", "I3"], price=5.0)),
           "price": (bun, ev(bun_id, type="purchase", item_id="I1", price=101.0)),
           "event_time": (rec, ev(rec_id, type="click", item_id="I1", event_time="2020-01-01T00:00:00Z"))}
    for field, (imp, e) in bad.items():
        got = bound_feedback(signer, imp, e, [10.0] * len(e.items or [e.item_id]), now)
        assert got is not None and got[0] == field, (field, got)
    late = bound_feedback(signer, rec, ok[0][1], [10.0], rec["t"] + int((IMPRESSION_TTL_S + 60) * 1e6))
    assert late[0] == "impression_id" and "days old" in late[1]
    # an id without what was shown (the format before 2026-12-02), signed with the same key, is refused
    old = {k: v for k, v in rec.items() if k not in ("s", "g")}
    payload = base64.urlsafe_b64encode(json.dumps(old, separators=(",", ":"), sort_keys=True).encode()).rstrip(b"=").decode()
    with pytest.raises(ValueError, match="older version"):
        signer.check(f"{payload}.{signer._tag(payload)}")


def test_a_shown_item_is_bought_at_most_once_per_answer():
    """A second purchase of a shown item on one answer, under another event id (a purchase, or an
    accepted bundle holding it), is a duplicate, not a row; clicks repeat freely; a purchase of the
    same item on another answer is new; the same event id twice is one event (before 2026-12-07 each
    new event id bought the item again)."""
    from types import SimpleNamespace

    from bundlerec.serving.feedback import feedback_rows
    from bundlerec.serving.schemas import FeedbackEvent

    signer = ImpressionSigner(b"k" * 32)
    rec_id, f = signer.issue("u1", None, None, "3", "recommendations", [["I1", "I2", "I3"]])
    other_id, _ = signer.issue("u1", None, None, "3", "recommendations", [["I1"]])
    bun_id, _ = signer.issue("u1", None, None, "3", "bundles", [["I1", "I2"], ["I3", "I4"]])
    cat = SimpleNamespace(item_pos={f"I{i}": i - 1 for i in range(1, 5)}, prices=np.array([10.0, 20.0, 30.0, 40.0]))
    now = f["t"] + 1_000_000

    def ev(imp, eid, **kw):
        return FeedbackEvent(impression_id=imp, event_id=eid, **kw)

    events = [ev(rec_id, "a", type="purchase", item_id="I1", price=10.0),
              ev(rec_id, "b", type="purchase", item_id="I1", price=10.0),  # bought again: a duplicate
              ev(rec_id, "c", type="click", item_id="I1"), ev(rec_id, "d", type="click", item_id="I1"),
              ev(other_id, "a", type="purchase", item_id="I1", price=10.0),  # another answer: new
              ev(bun_id, "x", type="purchase", item_id="I2", price=20.0),
              ev(bun_id, "y", type="bundle_accept", bundle_index=0, items=["I1", "I2"], price=27.0),  # I2 bought
              ev(bun_id, "z", type="bundle_accept", bundle_index=1, items=["I3", "I4"], price=63.0),
              ev(bun_id, "z", type="bundle_accept", bundle_index=1, items=["I3", "I4"], price=63.0)]  # same event
    out, dup = feedback_rows(events, signer, cat, lambda k: False, now)
    assert [rows[0]["event_id"] for _, rows in out] == ["a", "c", "d", "a", "x", "z"] and dup == 3
    assert [len(rows) for _, rows in out] == [1, 1, 1, 1, 1, 2]
    seen = {k for keys, _ in out for k in keys}  # what the replica records; a later request is checked against it
    again, dup2 = feedback_rows([ev(rec_id, "e", type="purchase", item_id="I1", price=10.0),
                                 ev(rec_id, "f", type="purchase", item_id="I2", price=20.0)],
                                signer, cat, seen.__contains__, now)
    assert [rows[0]["item_id"] for _, rows in again] == ["I2"] and dup2 == 1


def test_a_malformed_experiment_tag_is_refused_with_the_reason():
    """The registry tag is checked before a replica routes on it (anyone with registry write access
    can set it): each malformed form is refused naming what is wrong; the form `start` writes passes."""
    from bundlerec.experiments.lifecycle import ExperimentSpecError, check_spec, spec_of

    good = spec_of(ExperimentConfig())
    assert check_spec(good) == good
    arms = good["arms"]
    bad = {"no 'salt'": {**good, "salt": ""}, "no 'name'": {k: v for k, v in good.items() if k != "name"},
           "no numeric share": {**good, "arms": {**arms, "control": {"model": "champion"}}},
           "no model reference": {**good, "arms": {**arms, "treatment": {"share": 0.5}}},
           "sum to 1": {**good, "arms": {a: {**v, "share": 0.9} for a, v in arms.items()}},
           "control must be one of": {**good, "control": "nobody"},
           "'arms' object": {**good, "arms": ["control", "treatment"]},
           "not an object": ["a list"], "1-64 letters": {**good, "name": "../../etc"}}
    for why, spec in bad.items():
        with pytest.raises(ExperimentSpecError, match=why.replace("(", r"\(")):
            check_spec(spec)


def test_an_arm_can_be_a_pricing_policy_on_the_same_model_version():
    """experiment.pricing: arm -> limits that tighten each bundle request's; the registry form carries
    them, the replica's check refuses a malformed one, and a request's limits only ever get tighter."""
    from bundlerec.config import ConfigError
    from bundlerec.experiments.assignment import Experiment
    from bundlerec.experiments.lifecycle import ExperimentSpecError, check_spec
    from bundlerec.pricing.demand import PriceLimits, tightened

    cfg = ExperimentConfig(name="price-1", arms={"control": "champion", "treatment": "champion"},
                           pricing={"treatment": {"max_discount": 0.1, "price_ending": 0.99}})
    spec = spec_of(cfg)
    assert "pricing" not in spec["arms"]["control"] and spec["arms"]["treatment"]["pricing"] == {
        "max_discount": 0.1, "price_ending": 0.99}
    assert check_spec(spec) == spec
    exp = Experiment(spec, {"control": None, "treatment": None})
    assert exp.pricing("control") is None and exp.pricing("treatment")["max_discount"] == 0.1
    for bad, why in (({"discount": 0.1}, "unknown key"), ({"max_discount": 2}, "max_discount in"),
                     ({"max_discount": "0.1"}, "must be a number"), ([0.1], "an object")):
        with pytest.raises(ConfigError, match=why):
            ExperimentConfig(arms={"a": "champion", "b": "champion"}, shares={"a": 0.5, "b": 0.5}, control="a",
                             pricing={"b": bad})
        with pytest.raises(ExperimentSpecError, match=why):
            check_spec({**spec, "arms": {**spec["arms"], "treatment": {**spec["arms"]["treatment"], "pricing": bad}}})
    with pytest.raises(ConfigError, match="for arms of"):
        ExperimentConfig(pricing={"nobody": {"max_discount": 0.1}})
    asked = PriceLimits(max_discount=0.3, min_margin=0.2, price_ending=None)
    assert tightened(asked, None) == asked
    assert tightened(asked, {"max_discount": 0.5, "min_margin": 0.1}) == asked  # never looser than the request
    assert tightened(asked, {"max_discount": 0.1, "min_margin": 0.4, "price_ending": 0.99}) == PriceLimits(0.1, 0.4, 0.99)


def test_experiment_config_is_validated():
    from bundlerec.config import ConfigError

    with pytest.raises(ConfigError, match="sum to 1"):
        ExperimentConfig(shares={"control": 0.5, "treatment": 0.6})
    with pytest.raises(ConfigError, match="same arms"):
        ExperimentConfig(arms={"control": "champion", "x": "2"})
    with pytest.raises(ConfigError, match="metric"):
        PromotionRule(metric="ndcg")


# ---------------------------------------------------------------- the event log
def _imp(i: int) -> dict:
    return {"impression_id": f"i{i}", "event_time": 1_700_000_000_000_000 + i, "experiment": "e", "arm": "a",
            "model_name": "m", "model_version": "1", "endpoint": "bundles", "user_id": f"u{i}", "session_id": None,
            "items": ["I1"], "bundle_items": [["I1", "I2"]], "bundle_list_prices": [10.0], "bundle_prices": [9.0]}


def test_a_killed_writer_loses_nothing_it_acknowledged(tmp_path):
    """A process appends impressions and is SIGKILLed mid-stream; every row whose append returned
    (printed) is in Parquet after the next replica's recovery, none twice."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from bundlerec.experiments.event_log import EventLog\n"
            "from tests.test_experiments import _imp\n"
            f"el = EventLog({str(tmp_path)!r}, 'impressions', {str(tmp_path / '_wal')!r}, flush_rows=300)\n"
            "for i in range(100000):\n"
            "    el.append([_imp(i)]); print(i, flush=True)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    acked = []
    for line in p.stdout:
        acked.append(int(line))
        if len(acked) == 1000:  # after 3 rotations to Parquet and part of a 4th segment
            os.kill(p.pid, signal.SIGKILL)
            break
    p.wait()
    for line in p.stdout:  # printed before the kill landed: acknowledged too
        acked.append(int(line))
    # the dead writer's open segment, and the one it had sealed when the kill landed during that
    # segment's conversion to Parquet (the new segment opens before the sealed one is removed)
    assert 1 <= len(list((tmp_path / "_wal" / "impressions").glob("*.jsonl"))) <= 2
    survivor = EventLog(str(tmp_path), "impressions", str(tmp_path / "_wal"))
    assert survivor.recover() >= len(acked) - 900
    survivor.close()
    ids = pq.read_table(tmp_path / "impressions").column("impression_id").to_pylist()
    assert set(f"i{i}" for i in acked) <= set(ids) and len(ids) == len(set(ids))
    assert not list((tmp_path / "_wal" / "impressions").glob("*.jsonl"))


def test_online_log_flushes_on_time_and_on_close(tmp_path):
    log = OnlineLog(str(tmp_path), flush_s=0.2)
    log.impressions.append([_imp(0)])
    deadline = time.time() + 10
    while analysis.count_rows(str(tmp_path), "e") < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert analysis.count_rows(str(tmp_path), "e") == 1  # by the flusher thread
    log.impressions.append([_imp(1)])
    log.close()  # Serve's graceful shutdown
    assert analysis.count_rows(str(tmp_path), "e") == 2
    assert wal_dir_for("s3://b/x").endswith(".cache/bundlerec/wal") and wal_dir_for(str(tmp_path)).endswith("_wal")


def test_a_flush_writes_a_hidden_file_then_renames_it(tmp_path, monkeypatch):
    """A reader listing the folder while a replica flushes (the report, a notebook, Spark) never
    meets a half-written Parquet file: it is written as a dot file, which readers skip, then renamed."""
    from bundlerec.experiments import event_log

    written, real = [], event_log.pq.write_table
    monkeypatch.setattr(event_log.pq, "write_table", lambda t, path, **kw: (written.append(str(path)), real(t, path, **kw)))
    el = EventLog(str(tmp_path), "impressions", str(tmp_path / "_wal"))
    el.append([_imp(0)])
    el.flush()
    el.close()
    assert len(written) == 1 and os.path.basename(written[0]).startswith("."), written
    files = sorted(p.name for p in (tmp_path / "impressions").iterdir())
    assert len(files) == 1 and files[0].endswith(".parquet") and not files[0].startswith(".")
    assert pq.read_table(tmp_path / "impressions").num_rows == 1


def test_appends_never_wait_for_a_slow_store(tmp_path, monkeypatch):
    """The flush thread converts a sealed segment to Parquet while the store takes 2 s to answer (an
    object-store PUT on a bad day): appends meanwhile return at local-disk speed, and every row
    reaches Parquet once the store answers."""
    import threading

    from bundlerec.experiments import event_log

    real = event_log.pq.write_table

    def slow_write(*a, **k):  # the store is slow, not gone
        time.sleep(2.0)
        return real(*a, **k)

    monkeypatch.setattr(event_log.pq, "write_table", slow_write)
    el = EventLog(str(tmp_path), "impressions", str(tmp_path / "_wal"), flush_rows=50, convert_inline=False)
    for i in range(60):  # one segment sealed, 10 rows in the open one
        el.append([_imp(i)])
    flusher = threading.Thread(target=el.flush)
    flusher.start()
    time.sleep(0.2)  # the conversion is under way, waiting for the store
    worst = 0.0
    for i in range(60, 260):
        t = time.perf_counter()
        el.append([_imp(i)])
        worst = max(worst, time.perf_counter() - t)
    assert flusher.is_alive() and worst < 0.2, worst  # before 2026-12-02 appends waited for the store
    flusher.join()
    el.close()
    ids = pq.read_table(tmp_path / "impressions").column("impression_id").to_pylist()
    assert sorted(ids) == sorted(f"i{i}" for i in range(260))


@pytest.mark.timeout(300)
def test_an_object_store_outage_costs_no_append_and_no_acknowledged_row(tmp_path, monkeypatch):
    """The event log's Parquet on a real local S3 server (moto, server mode) that goes away while
    rows keep coming: appends go on at local-disk speed and none is refused; the conversion fails
    and the health says so, naming the store, not the disk; once a server answers on that address
    again, the next flush takes every row acknowledged since to the bucket exactly once and the
    health clears. (moto keeps objects in memory: what the first server held went with it.)"""
    from urllib.parse import urlparse

    import pyarrow.fs as pafs

    from tests.support import moto_server

    with moto_server() as (env, server):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        el = EventLog("s3://bundlerec-it/events", "impressions", str(tmp_path / "_wal"), flush_rows=50,
                      convert_inline=False)
        for i in range(60):
            el.append([_imp(i)])
        el.flush()  # the store answers
        assert el.last_error is None and el.written == 60
        server.kill()  # the store is gone
        server.wait(30)
        worst = 0.0
        for i in range(60, 260):
            t = time.perf_counter()
            el.append([_imp(i)])
            worst = max(worst, time.perf_counter() - t)
        with pytest.raises(OSError):
            el.flush()
        assert worst < 0.2 and el.refused == 0, (worst, el.refused)
        assert el.store_error and el.store_error.startswith("conversion") and el.wal_error is None
        assert el.backlog >= 1  # sealed segments kept on local disk for the next flush
        for i in range(260, 320):
            el.append([_imp(i)])
    with moto_server(port=urlparse(env["AWS_ENDPOINT_URL"]).port):  # the store is back (empty: moto)
        el.flush()
        el.close()
        assert el.last_error is None and el.written == 320
        fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], scheme="http",
                               access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"])
        ids = pq.read_table("bundlerec-it/events/impressions", filesystem=fs).column("impression_id").to_pylist()
        assert sorted(ids) == sorted(f"i{i}" for i in range(60, 320))  # every row acknowledged since, once


def test_a_full_write_ahead_disk_refuses_cleanly_and_loses_nothing_acknowledged(tmp_path):
    """The write-ahead log on a real 1 MiB tmpfs that fills up: the append that does not fit raises
    LogUnavailable (the app answers feedback 503, impressions go unlogged, never a 500) and leaves
    the segment clean; the error stays in the health until the disk takes an append again (a
    conversion to Parquet elsewhere does not clear it); with space freed, appends go on; Parquet holds
    exactly the acknowledged rows."""
    from bundlerec.experiments.event_log import LogUnavailable
    from tests.support import small_volume

    with small_volume(tmp_path / "vol", "1m") as vol:
        el = EventLog(str(tmp_path), "impressions", str(vol), flush_rows=10_000_000)
        filler = vol / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * (os.statvfs(vol).f_bavail * os.statvfs(vol).f_frsize - 64 * 1024))
        acked, refused, i = [], 0, 0
        while refused < 5 and i < 10_000:
            try:
                el.append([_imp(i)])
                acked.append(i)
            except LogUnavailable:
                refused += 1
            i += 1
        assert refused == 5 and acked and el.refused == 5 and el.last_error
        el.flush()  # the acknowledged rows reach Parquet (another disk): the write-ahead disk is still full
        assert el.last_error and el.last_error.startswith("write-ahead"), el.last_error  # cleared before 2026-12-07
        filler.unlink()  # space again
        for j in range(i, i + 100):
            el.append([_imp(j)])
            acked.append(j)
        assert el.last_error is None  # healthy again with the first append the disk takes
        el.close()
        ids = pq.read_table(tmp_path / "impressions").column("impression_id").to_pylist()
        assert sorted(ids) == sorted(f"i{k}" for k in acked)  # every acknowledged row, no refused one, none torn


# ---------------------------------------------------------------- the report and the rule
def _logs(rates: dict, users: int = 400, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Impressions (two per user: a recommendation and a bundle answer) and feedback whose click and
    bundle-accept probabilities are ``rates[arm]``; users split 50/50."""
    rng = np.random.default_rng(seed)
    imp, fb = [], []
    for u in range(users):
        arm = "control" if u % 2 == 0 else "treatment"
        p = rates[arm]
        for endpoint in ("recommendations", "bundles"):
            iid = f"{u}-{endpoint}"
            imp.append({"impression_id": iid, "experiment": "e", "arm": arm, "model_version": "1" if arm == "control" else "2",
                        "endpoint": endpoint, "user_id": f"u{u}",
                        "bundle_list_prices": [100.0, 50.0] if endpoint == "bundles" else []})
            if endpoint == "recommendations" and rng.random() < p:
                fb.append({"impression_id": iid, "event_id": "c", "item_id": "I1", "feedback_type": "click",
                           "revenue": 0.0, "price": 10.0, "quantity": 1, "bundle_index": None, "experiment": "e"})
                fb.append(fb[-1])  # sent twice: counted once
            if endpoint == "bundles" and rng.random() < p:
                for x, paid in (("I1", 60.0), ("I2", 30.0)):  # the 100.0 bundle bought at 90.0
                    fb.append({"impression_id": iid, "event_id": "b", "item_id": x, "feedback_type": "bundle_accept",
                               "revenue": paid, "price": paid, "quantity": 1, "bundle_index": 0, "experiment": "e"})
    return pd.DataFrame(imp), pd.DataFrame(fb)


SPEC = spec_of(ExperimentConfig(name="e"))


def test_the_report_counts_a_shown_item_bought_once_per_answer():
    """Repeat purchases of one shown item on one answer under new event ids (a replica that could not
    reach the shared keys lets them in) add no revenue; the same item bought on another answer does."""
    imp, fb = _logs({"control": 1.0, "treatment": 1.0}, users=4)
    buy = {"event_id": "p", "item_id": "I7", "feedback_type": "purchase", "revenue": 10.0, "price": 10.0,
           "quantity": 1, "bundle_index": None, "experiment": "e"}
    extra = [{**buy, "impression_id": "0-recommendations"}, {**buy, "impression_id": "0-recommendations", "event_id": "q"},
             {**buy, "impression_id": "2-recommendations", "event_id": "q"}]
    base = analysis.per_user(imp, fb)[0]
    users, acc = analysis.per_user(imp, pd.concat([fb, pd.DataFrame(extra)], ignore_index=True))
    assert users.revenue.sum() == pytest.approx(base.revenue.sum() + 20.0)
    assert acc["duplicate_rows_dropped"] == analysis.per_user(imp, fb)[1]["duplicate_rows_dropped"] + 1


def test_report_counts_once_and_finds_a_real_difference():
    imp, fb = _logs({"control": 0.2, "treatment": 0.4})
    rep = analysis.report(imp, fb, SPEC, bootstrap=1000)
    assert rep["duplicate_rows_dropped"] > 0 and rep["feedback_without_impression"] == 0
    c, t = rep["arms"]["control"], rep["arms"]["treatment"]
    assert c["units"] == t["units"] == 200 and c["impressions"] == 400
    clicked = fb.drop_duplicates(["impression_id", "event_id", "item_id"])
    for arm, m in (("control", c), ("treatment", t)):
        rows = clicked[clicked.impression_id.isin(imp[imp.arm == arm].impression_id)]
        assert m["metrics"]["ctr"]["estimate"] == pytest.approx((rows.feedback_type == "click").sum() / 400)
        assert m["metrics"]["realized_discount"]["estimate"] == pytest.approx(0.1)
        lo, hi = m["metrics"]["ctr"]["ci95"]
        assert lo < m["metrics"]["ctr"]["estimate"] < hi
    d = rep["differences"]["treatment"]["revenue_per_impression"]
    assert d["lower"] > 0 and d["ci95"][0] > 0 and rep["srm"]["p_value"] > 0.01
    rule = PromotionRule(min_units=100)
    assert decide(rep, rule, "control")["promote"] == "treatment"
    # the other way round: nothing to promote, and why
    worse = decide(analysis.report(*_logs({"control": 0.4, "treatment": 0.2}), SPEC, bootstrap=500), rule, "control")
    assert worse["promote"] is None and "not better" in worse["reasons"][0]


def test_the_rule_refuses_on_sample_ratio_mismatch_guardrails_and_small_samples():
    imp, fb = _logs({"control": 0.2, "treatment": 0.4})
    lopsided = imp[(imp.arm == "control") | (imp.user_id.str[1:].astype(int) % 4 == 1)]  # half the treatment lost
    rep = analysis.report(lopsided, fb, SPEC, bootstrap=500)
    d = decide(rep, PromotionRule(min_units=10), "control")
    assert rep["srm"]["p_value"] < 0.001 and d["promote"] is None and "sample ratio mismatch" in d["reasons"][0]
    rep = analysis.report(imp, fb, SPEC, bootstrap=500)
    assert decide(rep, PromotionRule(min_units=1000), "control")["promote"] is None
    rep["differences"]["treatment"]["conversion"]["upper"] = -0.01  # a guardrail clearly worse
    assert "guardrail" in decide(rep, PromotionRule(min_units=10), "control")["reasons"][0]


def test_an_aa_comparison_rarely_promotes():
    """Both arms the same: over 40 simulated A/A logs the one-sided 95 % rule promotes at most a few."""
    promoted = sum(decide(analysis.report(*_logs({"control": 0.3, "treatment": 0.3}, seed=s), SPEC, bootstrap=300,
                                        seed=s), PromotionRule(min_units=10), "control")["promote"] is not None
                   for s in range(40))
    assert promoted <= 6, promoted  # binomial(40, 0.05): P(> 6) < 0.01


def test_feedback_rows_are_clickstream_rows_prep_accepts(tmp_path):
    """What /v1/feedback writes reads back through prep's own normalization with nothing quarantined."""
    from bundlerec.data.validate import normalize_events

    el = EventLog(str(tmp_path), "feedback", str(tmp_path / "_wal"))
    el.append([{"event_time": 1_700_000_000_000_000, "event_type": t, "user_id": "u1", "session_id": None,
                "item_id": "I000001", "price": 9.5, "quantity": 1, "impression_id": "x.y", "event_id": f"e{t}",
                "feedback_type": t, "experiment": "e", "arm": "a", "model_version": "1", "bundle_index": None,
                "revenue": 9.5 if t == "purchase" else 0.0, "received_time": 1_700_000_000_000_000}
               for t in ("click", "cart", "purchase")])
    el.close()
    batch = pq.read_table(tmp_path / "feedback").to_pandas()
    out = normalize_events(batch, {}, {}, "s", pd.Index(["I000001"]))
    assert out.quarantine_reason.isna().all() and list(out.event_type) == ["click", "cart", "purchase"]
    assert json.loads(json.dumps(list(out.columns)))[:5] == ["event_time", "event_type", "user_id", "session_id", "item_id"]


# ---------------------------------------------------------------- the whole loop over real HTTP
def _post(url, body, token):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class _Steady:
    """Recommendations sent one after another while the experiment changes: every answer must be 200."""

    def __init__(self, url: str, token: str):
        import threading

        self.codes: list = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(url, token), daemon=True)

    def _run(self, url, token):
        i = 0
        while not self._stop.is_set():
            self.codes.append(_post(f"{url}/v1/recommendations", {"user_id": f"steady-{i}", "k": 3}, token)[0])
            i += 1

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(60)


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.e2e
def test_an_experiment_over_http_finds_the_better_arm_and_promotes_it(tiny_trained, mlflow_server, ray_cluster,
                                                                       tmp_path):
    """champion = a deliberately worse model (the trained export with a shuffled item index, served alone),
    challenger = the trained model. Started with `jobs.experiment start`, the replicas split
    simulated shoppers between them (sticky); one replica is SIGKILLed mid-run and every impression a
    shopper received is still in the Parquet log; `jobs.experiment_report --promote` finds the
    challenger better and moves champion, which the replicas then serve. Then one A/A run of the
    documented false-positive command does not promote."""
    import shutil
    import threading

    import mlflow
    from ray import serve
    from ray.util.state import list_actors

    from bundlerec.experiments.simulator import simulate
    from bundlerec.inference.fusion import FusionParams
    from bundlerec.integrity import seal
    from bundlerec.price import attach_pricing
    from bundlerec.experiments.lifecycle import aa_false_positives, read, wait_for_experiment
    from bundlerec.registry.promotion import register, set_alias
    from bundlerec.serving.auth import write_token_file
    from bundlerec.client import http_json
    from bundlerec.serving.deploy import deploy
    from jobs import experiment as experiment_job, experiment_report
    from tests.support import free_port, mount_tmpfs, tiny_config, unmount

    cfg0, trained, _ = tiny_trained
    name, prep = "bundlerec-exp", cfg0.data.output_dir
    good, worse = str(tmp_path / "good"), str(tmp_path / "worse")
    shutil.copytree(trained["export_dir"], good)
    attach_pricing(cfg0, good)
    shutil.copytree(good, worse)
    index = np.load(f"{worse}/item_index.npy")
    np.save(f"{worse}/item_index.npy", index[np.random.default_rng(0).permutation(len(index))])
    # ... and served by that index alone: the fit's fusion may leave the tuned channel out (on the tiny
    # data it chose item-kNN, popularity, lexical and SASRec), and then the shuffle would change nothing
    FusionParams({"tuned": 1.0}, {"chosen_on": "the test: a deliberately worse model"}).save(worse)
    seal(worse)
    v_good = register(good, prep, mlflow_server, "experiments-test", model_name=name, history_len=cfg0.data.history_len)
    v_worse = register(worse, prep, mlflow_server, "experiments-test", model_name=name, history_len=cfg0.data.history_len)
    client = mlflow.MlflowClient(mlflow_server)
    set_alias(client, name, "champion", v_worse["version"])  # the incumbent is the worse model
    set_alias(client, name, "challenger", v_good["version"])

    port, logs = free_port(), tmp_path / "online"
    token = write_token_file(str(tmp_path / "api_token"))
    wal = logs / "_wal"  # the replicas' write-ahead folder, on a real 64 MiB disk that the end fills
    unmountable = mount_tmpfs(wal, "64m")
    overrides = [f"data.output_dir={prep}", f"serve.model_name={name}", f"serve.url=http://127.0.0.1:{port}",
                 f"serve.dashboard_url={ray_cluster}", f"mlflow.tracking_uri={mlflow_server}", "serve.poll_s=1",
                 "serve.auth=true", f"serve.token_file={tmp_path / 'api_token'}", f"serve.event_log_dir={logs}",
                 "serve.event_flush_s=1", f"serve.model_cache_dir={tmp_path / 'models'}", "experiment.name=ab-1",
                 "experiment.promotion.min_units=50", "experiment.bootstrap=1000",
                 # the default always-valid rule on conversion: 300 shoppers are too few for it to
                 # resolve the revenue difference (+30 of 65 per impression), as docs/benchmarks.md says
                 "experiment.promotion.metric=conversion", "experiment.promotion.guardrails=[ctr]"]
    cfg = tiny_config(*overrides)
    url = cfg.serve.url
    try:
        deploy(cfg, version=v_worse["version"], timeout_s=240)
        # --- no experiment: every answer still carries an impression id and the version
        code, body = _post(f"{url}/v1/recommendations", {"user_id": "nobody", "k": 3}, token)
        assert code == 200 and body["impression_id"] and body["experiment"] is None
        assert body["model"]["version"] == v_worse["version"]

        # --- a pre-period: half the shoppers of the experiment below come first with no experiment running
        pre = simulate(url, prep, 150, token, seed=1)
        assert set(pre["truth"]) == {"None"} and pre["truth"]["None"]["users"] == 150

        # --- start (what users run); every replica loads both arms, no redeploy
        with _Steady(url, token) as steady:
            experiment_job.main(["start", *overrides])
            wait_for_experiment(url, token, "ab-1")
        assert len(steady.codes) >= 5 and set(steady.codes) == {200}, steady.codes  # no request lost
        state = http_json(f"{url}/v1/experiment", token=token)["experiment"]
        assert {a: v["version"] for a, v in state["arms"].items()} == {"control": v_worse["version"],
                                                                       "treatment": v_good["version"]}
        # a malformed tag (anyone with registry write access can set one) is refused with the reason,
        # the running split stays, the replicas keep following the registry; put right, it is taken
        from bundlerec.experiments.lifecycle import TAG

        import urllib.request

        def readyz() -> dict:
            with urllib.request.urlopen(f"{url}/readyz", timeout=30) as r:
                return json.loads(r.read())

        def settled(get, ok) -> dict:  # the same answer 6 times running: every replica has seen the tag
            deadline, streak = time.time() + 60, 0
            while time.time() < deadline and streak < 6:
                got = get()
                streak = streak + 1 if ok(got) else 0
                time.sleep(0.25)
            assert streak >= 6, got
            return got

        good_tag = client.get_registered_model(name).tags[TAG]
        client.set_registered_model_tag(name, TAG, json.dumps({**json.loads(good_tag), "salt": None}))
        now = settled(lambda: http_json(f"{url}/v1/experiment", token=token), lambda r: r["refused"] is not None)
        assert "salt" in now["refused"]["error"] and now["experiment"] == state, now
        assert _post(f"{url}/v1/recommendations", {"user_id": "nobody", "k": 3}, token)[0] == 200
        settled(readyz, lambda r: r["experiment_refused"] is True and r["watch_ok"] is True)
        client.set_registered_model_tag(name, TAG, good_tag)
        assert settled(lambda: http_json(f"{url}/v1/experiment", token=token),
                       lambda r: r["refused"] is None) == {**now, "refused": None}
        # anonymous shopper: the session id comes back and keeps the arm
        events = [{"item_id": "I000001", "event_type": "view", "event_time": "2026-11-30T10:00:00Z"}]
        code, first = _post(f"{url}/v1/recommendations", {"events": events, "k": 3}, token)
        assert code == 200 and first["session_id"].startswith("anon-") and first["experiment"]["experiment"] == "ab-1"
        for _ in range(6):
            code, again = _post(f"{url}/v1/bundles", {"events": events, "n": 1, "session_id": first["session_id"]}, token)
            assert code == 200 and again["experiment"] == first["experiment"] and again["session_id"] is None
            assert again["model"]["version"] == state["arms"][first["experiment"]["arm"]]["version"]
        # --- feedback: checked before anything is written; a repeat counts once
        ok = {"impression_id": first["impression_id"], "event_id": "c1", "type": "click",
              "item_id": first["items"][0]["item_id"]}
        forged = {**ok, "impression_id": first["impression_id"][:-3] + "abc"}
        code, body = _post(f"{url}/v1/feedback", {"events": [ok, forged]}, token)
        assert code == 422 and body["detail"][0]["loc"] == ["body", "events", 1, "impression_id"], body
        assert _post(f"{url}/v1/feedback", {"events": [{**ok, "item_id": "no-such-item"}]}, token)[0] == 422
        not_shown = next(x for x in pd.read_parquet(f"{good}/items.parquet").item_id.astype(str)
                         if x not in {i["item_id"] for i in first["items"]})
        code, body = _post(f"{url}/v1/feedback", {"events": [{**ok, "item_id": not_shown}]}, token)
        assert code == 422 and body["detail"][0]["loc"] == ["body", "events", 0, "item_id"], body  # not shown
        assert _post(f"{url}/v1/feedback", {"events": [{**ok, "type": "bundle_accept"}]}, token)[0] == 422
        assert _post(f"{url}/v1/feedback", {"events": [ok]}, None)[0] == 401
        code, res = _post(f"{url}/v1/feedback", {"events": [ok, ok]}, token)  # ok was in the refused request
        assert code == 200 and res == {"accepted": 1, "duplicates": 1}  # ... and was not recorded then
        # the same event again and again, whichever replica each request reaches: never accepted twice
        repeats = [_post(f"{url}/v1/feedback", {"events": [ok]}, token) for _ in range(8)]
        assert all(c == 200 and r == {"accepted": 0, "duplicates": 1} for c, r in repeats), repeats
        answered = {http_json(f"{url}/v1/model", token=token)["replica"] for _ in range(12)}
        assert len(answered) == 2, answered  # both replicas answered (random routing), so both were asked
        # a cart completion is an answer like the others: its impression id takes a click on what it showed
        code, done = _post(f"{url}/v1/bundles/complete", {"items": [first["items"][0]["item_id"]], "k": 3,
                                                          "session_id": first["session_id"]}, token)
        assert code == 200 and done["impression_id"] and done["experiment"] == first["experiment"], done
        click = {"impression_id": done["impression_id"], "event_id": "cc", "type": "click", "item_id": done["items"][0]["item_id"]}
        assert _post(f"{url}/v1/feedback", {"events": [click]}, token)[1] == {"accepted": 1, "duplicates": 0}
        accept = {"impression_id": done["impression_id"], "event_id": "ca", "type": "bundle_accept",
                  "items": [click["item_id"]], "bundle_index": 0, "price": 1.0}
        code, body = _post(f"{url}/v1/feedback", {"events": [accept]}, token)
        assert code == 422 and body["detail"][0]["loc"] == ["body", "events", 0, "type"], body  # not a bundles answer
        once = {**ok, "event_id": "c-once"}
        firsts = [_post(f"{url}/v1/feedback", {"events": [once]}, token)[1]["accepted"] for _ in range(6)]
        assert firsts == [1, 0, 0, 0, 0, 0], firsts

        # --- simulated shoppers; one replica SIGKILLed part-way
        box: dict = {}
        sim = threading.Thread(target=lambda: box.update(simulate(url, prep, 300, token, seed=1, collect_ids=True, visit=1)))
        sim.start()
        time.sleep(8)
        victim = [a for a in list_actors(address=ray_cluster, filters=[("state", "=", "ALIVE")], limit=10_000)
                  if a.class_name.startswith("ServeReplica:bundlerec:")][0]
        os.kill(victim.pid, signal.SIGKILL)
        sim.join(600)
        truth = box["truth"]
        assert set(truth) == {"control", "treatment"}, truth  # sticky: no shopper saw two arms
        received = set(box["impression_ids"])
        deadline = time.time() + 60  # the last answers reach Parquet at the replicas' next flush (1 s)
        while True:
            logged = set(pq.read_table(logs / "impressions", columns=["impression_id"]).column(0).to_pylist())
            if received <= logged or time.time() > deadline:
                break
            time.sleep(1)
        assert received <= logged, f"{len(received - logged)} impressions shoppers received are not logged"

        # --- report + promotion (what users run)
        with _Steady(url, token) as steady:  # promotion: the experiment stops and champion moves, live
            out = experiment_report.main([*overrides, "--promote"])
            wait_for_experiment(url, token, None)
            deadline, streak = time.time() + 60, 0  # every replica follows the moved champion
            while streak < 8 and time.time() < deadline:
                streak = streak + 1 if http_json(f"{url}/readyz")["model"]["version"] == v_good["version"] else 0
                time.sleep(0.25)
        assert streak >= 8 and len(steady.codes) >= 5 and set(steady.codes) == {200}, steady.codes
        rep = out["report"]
        for arm in ("control", "treatment"):
            assert rep["arms"][arm]["units"] >= truth[arm]["users"]  # + the anonymous shopper above
        assert out["decision"]["promote"] == "treatment", out["decision"]
        primary = rep["differences"]["treatment"][cfg.experiment.promotion.metric]
        assert primary["lower"] > 0 and [primary["lower"], primary["upper"]] == primary["always_valid"]["interval"]
        # CUPED read the returning shoppers' pre-period from the same Parquet logs
        assert rep["bounds"] == "always-valid (mSPRT, CUPED)" and rep["pre_period_users"] >= 150, rep["pre_period_users"]  # + the steady clients
        assert primary["always_valid"]["cuped_variance_reduction"] > 0
        assert out["promotion"]["promoted"] and client.get_model_version_by_alias(name, "champion").version == v_good["version"]
        tags = client.get_model_version(name, v_good["version"]).tags
        assert json.loads(tags["promotion"])["arm"] == "treatment" and "online.ab-1" in tags
        run = client.get_run(client.get_model_version(name, v_good["version"]).run_id)
        assert run.data.metrics["online.ab-1.revenue_per_impression"] == pytest.approx(
            rep["arms"]["treatment"]["metrics"]["revenue_per_impression"]["estimate"])
        assert (logs / "reports" / "ab-1.png").stat().st_size > 10_000
        assert read(client, name) is None  # the promotion ended the experiment

        # --- A/A: the documented false-positive command, one run, does not promote
        aa = aa_false_positives(cfg, runs=1, users=100, token=token, seed=7, tag="test")
        only = aa["results"][0]
        assert aa["false_positives"] == 0 and only[aa["rule"]]["lower"] <= 0, aa  # not "better"
        assert only["srm_p"] > 0.001 and sum(only["units"].values()) == 100

        # --- two price policies on one model version: compared, and the better one promoted onto it
        _price_policies(overrides, url, token, prep, logs, client, name, v_good["version"])
        # --- the demand model refitted on the explored offers and their feedback, then serving
        _demand_refit(overrides, url, token, prep, logs, client, name)

        # --- the write-ahead disk fills up under the running deployment
        if unmountable is None:
            _a_full_write_ahead_disk_over_http(url, token, wal, logs)
        elif os.environ.get("CI"):
            pytest.fail(f"the full-disk part needs a tmpfs mount: {unmountable}")
    finally:
        serve.shutdown()
        if unmountable is None:
            unmount(wal)


def _every_replica(get, want, agree: int = 8, timeout_s: float = 60.0) -> None:
    """Until ``agree`` answers in a row of ``get()`` (any replica) are ``want``."""
    deadline, streak, got = time.time() + timeout_s, 0, None
    while streak < agree and time.time() < deadline:
        got = get()
        streak = streak + 1 if got == want else 0
        time.sleep(0.25)
    assert streak >= agree, f"replicas still answer {got!r}, not {want!r}, after {timeout_s:.0f}s"


def _price_policies(overrides, url, token, prep, logs, client, name, version):
    """Both arms serve one version; control sells at list price (max_discount 0), the treatment may
    discount up to 40 %. Simulated shoppers accept discounted bundles more often: the report on
    bundle take rate promotes the treatment's policy, which then prices every bundle of the champion."""
    from bundlerec.client import http_json
    from bundlerec.experiments.lifecycle import PRICING_TAG, wait_for_experiment
    from bundlerec.experiments.simulator import simulate
    from jobs import experiment as experiment_job, experiment_report

    price = [*overrides, "experiment.name=price-1", "experiment.arms={control: champion, treatment: champion}",
             "experiment.pricing={control: {max_discount: 0.0}, treatment: {max_discount: 0.4}}",
             "experiment.promotion.metric=bundle_take_rate", "experiment.promotion.guardrails=[]",
             "experiment.promotion.sequential=false"]  # one look, at a horizon fixed here
    experiment_job.main(["start", *price])
    wait_for_experiment(url, token, "price-1")
    sim = simulate(url, prep, 300, token, seed=3)
    analysis.wait_for_rows(str(logs), "price-1", sum(t["impressions"] for t in sim["truth"].values()))
    out = experiment_report.main([*price, "--promote"])
    rep = out["report"]
    assert set(rep["versions"].values()) == {version}  # one model version, two policies
    assert rep["arms"]["control"]["metrics"]["realized_discount"]["estimate"] == pytest.approx(0, abs=1e-6)
    assert 0 < rep["arms"]["treatment"]["metrics"]["realized_discount"]["estimate"] <= 0.4
    assert out["decision"]["promote"] == "treatment", out["decision"]
    assert out["promotion"]["promoted"] and out["promotion"]["pricing"] == {"max_discount": 0.4}, out["promotion"]
    assert json.loads(client.get_registered_model(name).tags[PRICING_TAG]) == {"max_discount": 0.4}
    assert client.get_model_version_by_alias(name, "champion").version == version
    wait_for_experiment(url, token, None)
    policy = lambda: http_json(f"{url}/v1/model", token=token)["pricing_policy"]  # noqa: E731
    _every_replica(policy, {"max_discount": 0.4})  # every replica follows the promoted policy
    events = [{"item_id": "I000001", "event_type": "view", "event_time": "2026-11-30T10:00:00Z"}]
    code, b = _post(f"{url}/v1/bundles", {"events": events, "n": 3, "max_discount": 0.9}, token)
    assert code == 200 and b["bundles"] and all((x["discount"] or 0) <= 0.4 + 1e-9 for x in b["bundles"]), b
    assert all(x["optimal_price"] is None for x in b["bundles"])  # no exploration in this policy

    # the same policy exploring prices: each offered bundle's price is drawn around the optimum, and
    # the answer and the impression log say where the optimum was and how likely the price shown
    explore = {"max_discount": 0.4, "explore": 0.1}
    client.set_registered_model_tag(name, PRICING_TAG, json.dumps(explore))
    _every_replica(policy, explore)
    answers = [_post(f"{url}/v1/bundles", {"events": events, "n": 3, "max_discount": 0.9}, token)[1] for _ in range(12)]
    offered = [(a["impression_id"], j, x) for a in answers for j, x in enumerate(a["bundles"]) if x["offer"] == "bundle"]
    assert offered, answers
    for _, _, x in offered:
        assert x["optimal_price"] and 0.2 <= x["price_propensity"] <= 1 and x["discount"] <= 0.4 + 1e-9
        assert abs(x["bundle_price"] - x["optimal_price"]) <= 0.1 * x["list_price"] + 0.01
    assert any(x["bundle_price"] != x["optimal_price"] for _, _, x in offered), offered  # it did explore
    deadline = time.time() + 30
    wanted = {i for i, _, _ in offered}
    while True:  # the impressions reach Parquet at the replicas' next flush
        t = pq.read_table(logs / "impressions").to_pandas()
        rows = t[t.impression_id.isin(wanted)].set_index("impression_id")
        if len(rows) == len(wanted) or time.time() > deadline:
            break
        time.sleep(0.5)
    for i, j, x in offered:
        assert rows.bundle_prices[i][j] == x["bundle_price"] and rows.bundle_optimal_prices[i][j] == x["optimal_price"]
        assert rows.bundle_price_propensities[i][j] == x["price_propensity"]

    # a challenger price policy (an off-policy estimate's subject): every price moved by 5 % of its list price
    shift = {"max_discount": 0.4, "shift": -0.05}
    client.set_registered_model_tag(name, PRICING_TAG, json.dumps(shift))
    _every_replica(policy, shift)
    code, b = _post(f"{url}/v1/bundles", {"events": events, "n": 3, "max_discount": 0.9}, token)
    assert code == 200 and b["bundles"], b
    moved = []
    for x in b["bundles"]:
        assert x["bundle_price"] is not None and x["price_propensity"] == 1.0 and x["discount"] <= 0.4 + 1e-9, x
        want, tol = x["optimal_price"] - 0.05 * x["list_price"], 0.01 + x["list_price"] / 400
        assert want - tol <= x["bundle_price"] <= x["optimal_price"], x  # moved down, unless a limit stops it sooner
        moved.append(abs(x["bundle_price"] - want) <= tol)
    assert any(moved), b


def _demand_refit(overrides, url, token, prep, logs, client, name):
    """Shoppers with known willingness to pay (the simulator's Demand) meet the champion's exploring
    policy; `jobs.fit_demand` fits the demand model on every priced offer logged (Ray Data) and the
    bundle_accept feedback, and registers it as a new version (challenger: a price model changes no
    offline metric). Made champion, it is what prices every replica's bundles: price_source "feedback"."""
    from bundlerec.client import http_json
    from bundlerec.experiments.simulator import Demand, simulate
    from bundlerec.registry.promotion import set_alias
    from jobs import fit_demand

    sim = simulate(url, prep, 150, token, seed=5, collect_ids=True, demand=Demand())
    accepted, shown = sim["truth"]["None"]["accepted"], set(sim["impression_ids"])
    deadline = time.time() + 60  # the last offers and acceptances reach Parquet at the next flush
    while time.time() < deadline:
        imp = set(pq.read_table(logs / "impressions", columns=["impression_id"]).column(0).to_pylist())
        fb = pq.read_table(logs / "feedback", columns=["impression_id", "feedback_type", "event_id"]).to_pandas()
        took = fb[fb.impression_id.isin(shown) & (fb.feedback_type == "bundle_accept")].drop_duplicates(["impression_id", "event_id"])
        if shown <= imp and len(took) >= accepted:
            break
        time.sleep(0.5)
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"file://{logs.parent}/not-the-registry")  # the job names its own, as a new process does
    try:
        out = fit_demand.main(overrides)
    finally:
        mlflow.set_tracking_uri(before)
    fit, reg = out["fit"], out["registered"]
    # every priced offer of the model in the log: this part's explored ones and the earlier parts' others
    assert fit["n_offers"] >= 300 and fit["explored_share"] > 0 and fit["n_accepted"] >= accepted, fit
    assert reg["alias"] == "challenger" and 0.01 < fit["s"] < 5, out
    tag = json.loads(client.get_model_version(name, reg["version"]).tags["bundlerec.demand"])
    assert tag["n_offers"] == fit["n_offers"] and tag["theta"] == [round(t, 6) for t in fit["theta"]]
    set_alias(client, name, "champion", reg["version"])
    _every_replica(lambda: http_json(f"{url}/v1/model", token=token)["pricing"]["source"], "feedback")
    events = [{"item_id": "I000001", "event_type": "view", "event_time": "2026-11-30T10:00:00Z"}]
    code, b = _post(f"{url}/v1/bundles", {"events": events, "n": 3}, token)
    priced = [x for x in b["bundles"] if x["list_price"]]
    assert code == 200 and priced and {x["price_source"] for x in priced} == {"feedback"}, b
    assert all((x["discount"] or 0) <= 0.4 + 1e-9 for x in priced)  # the promoted policy's limit still holds


def _post_with_headers(url, body, token) -> tuple:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers  # case-insensitive
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), e.headers


def _a_full_write_ahead_disk_over_http(url, token, wal, logs):
    """The write-ahead disk full under two replicas: every recommendation is answered 200 (its
    impression unlogged); feedback the disk refuses is a 503 with Retry-After (never a 500) and is
    not recorded; /v1/model and /readyz show the write-ahead error; with space again the refused
    events are accepted when sent again, and every acknowledged event is in Parquet exactly once."""
    from bundlerec.client import http_json
    from tests.support import fill_volume

    code, answer = _post(f"{url}/v1/recommendations", {"user_id": "full-disk", "k": 3}, token)
    assert code == 200
    filler = fill_volume(wal)

    def click(i):
        return {"impression_id": answer["impression_id"], "event_id": f"full-{i}", "type": "click",
                "item_id": answer["items"][0]["item_id"]}

    acked, refused, rec_codes = [], [], []
    for i in range(200):  # a segment's last page may take a few rows before the disk refuses
        rec_codes.append(_post(f"{url}/v1/recommendations", {"user_id": f"full-{i}", "k": 3}, token)[0])
        code, body, headers = _post_with_headers(f"{url}/v1/feedback", {"events": [click(i)]}, token)
        assert code in (200, 503), (code, body)
        if code == 503:
            assert headers.get("Retry-After") == "5" and "not recorded" in body["detail"], (body, headers)
            refused.append(i)
        else:
            acked.append(i)
        if len(refused) >= 5:
            break
    assert len(refused) >= 5 and set(rec_codes) == {200}, (refused, set(rec_codes))
    health = [http_json(f"{url}/v1/model", token=token)["event_log"] for _ in range(12)]
    assert any(h["ok"] is False and "write-ahead" in (h["feedback"]["last_error"] or "") for h in health), health
    assert any(http_json(f"{url}/readyz")["event_log_ok"] is False for _ in range(12))
    filler.unlink()  # space again: the client sends the refused events again
    for i in refused:
        assert _post(f"{url}/v1/feedback", {"events": [click(i)]}, token)[1] == {"accepted": 1, "duplicates": 0}
    want = sorted(f"full-{i}" for i in acked + refused)
    deadline = time.time() + 60  # the next flush (1 s) takes them to Parquet
    while True:
        got = sorted(x for x in pq.read_table(logs / "feedback", columns=["event_id"]).column(0).to_pylist()
                     if x.startswith("full-"))
        if got == want or time.time() > deadline:
            break
        time.sleep(1)
    assert got == want, (len(got), len(want))  # each acknowledged event once, nothing refused twice


def test_two_replicas_on_one_node_never_take_each_others_live_segments(tmp_path):
    """Replicas on a node share the write-ahead folder; each recovers unlocked segments every flush.
    One writes and rotates fast while the other recovers in a loop: every row is in Parquet once."""
    import threading

    wal = str(tmp_path / "_wal")
    writer, other = EventLog(str(tmp_path), "impressions", wal, flush_rows=7), EventLog(str(tmp_path), "impressions", wal)
    stop = threading.Event()

    def recover_forever():
        while not stop.is_set():
            other.recover()

    t = threading.Thread(target=recover_forever)
    t.start()
    for i in range(3000):
        writer.append([_imp(i)])
    stop.set()
    t.join()
    writer.close()
    other.close()
    ids = pq.read_table(tmp_path / "impressions").column("impression_id").to_pylist()
    assert sorted(ids) == sorted(f"i{i}" for i in range(3000))


def test_retention_deletes_event_files_older_than_the_limit_and_only_those(tmp_path):
    """serve event_log_retention_days: a file's age is the UTC time its segment began (its name);
    older ones go, newer ones and files named otherwise stay; the replicas' flush thread applies it."""
    import calendar

    from bundlerec.experiments.event_log import EventLog

    el = EventLog(str(tmp_path), "impressions", str(tmp_path / "_wal"))
    el.append([_imp(0)])
    el.flush()
    fresh = sorted((tmp_path / "impressions").glob("*.parquet"))
    assert len(fresh) == 1
    day = 86400
    now = calendar.timegm(time.strptime("20261206T120000", "%Y%m%dT%H%M%S"))
    old = tmp_path / "impressions" / "20261101T000000-aaaaaaaaaaaa.parquet"
    recent = tmp_path / "impressions" / "20261205T000000-bbbbbbbbbbbb.parquet"
    other = tmp_path / "impressions" / "notes.parquet"
    for f in (old, recent, other):
        f.write_bytes(fresh[0].read_bytes())
    assert el.prune(30 * day, now=now) == 1 and not old.exists() and recent.exists() and other.exists()
    assert el.prune(30 * day, now=now) == 0  # nothing more (another replica may have been first)
    el.close()
    # the flush thread of a replica's OnlineLog applies it at its first flush
    log = OnlineLog(str(tmp_path), flush_s=0.1, retention_days=0.5)
    deadline = time.time() + 10
    while recent.exists() and time.time() < deadline:
        time.sleep(0.05)
    log.close()
    assert not recent.exists() and other.exists() and fresh[0].exists()  # the file of today stays


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_the_report_reads_the_same_rows_with_ray_data_and_with_arrow(ray_cluster, tmp_path):
    """experiment.ray_data_min_mb: a log that large is read by Ray Data, a smaller one by Arrow in the
    report's process; both push the same filters down (the experiment; the pre-period's window, users
    and their impressions' feedback) and return the same rows, across many small files."""
    t0 = 1_700_000_000_000_000
    el, fb = EventLog(str(tmp_path), "impressions", str(tmp_path / "_wal")), EventLog(str(tmp_path), "feedback", str(tmp_path / "_wal"))
    day = 86_400_000_000
    for i in range(60):  # a flush per 4 rows: 15 files; the first 20 rows before the experiment, one too early
        exp = "e" if i >= 20 else None
        when = t0 + i if i else t0 - 40 * day
        el.append([{**_imp(i), "event_time": when, "experiment": exp, "arm": "a" if exp else None, "user_id": f"u{i % 25}"}])
        fb.append([{"event_time": when, "event_type": "click", "user_id": f"u{i % 25}", "item_id": "I1", "price": 9.0,
                    "quantity": 1, "impression_id": f"i{i}", "event_id": f"c{i}", "feedback_type": "click",
                    "experiment": exp, "arm": "a" if exp else None, "revenue": 0.0, "received_time": when}])
        if i % 4 == 3:
            el.flush(), fb.flush()
    el.close(), fb.close()
    got = {}
    for mb in (0.0, 256.0):  # Ray Data, then Arrow
        imp, feedback = analysis.read_logs(str(tmp_path), "e", mb)
        pre = analysis.read_pre_period(str(tmp_path), imp, 28, mb)
        got[mb] = [imp.sort_values("impression_id", ignore_index=True),
                   feedback.sort_values("impression_id", ignore_index=True),
                   pre.sort_values("user_id", ignore_index=True)]
    assert len(got[0.0][0]) == 40 and len(got[0.0][1]) == 40
    # the pre-period: impressions 1-19 of the experiment's users (u0's first row is 40 days before)
    assert got[0.0][2].impressions.sum() == 19 and got[0.0][2].clicked.sum() == 19
    for a, b in zip(got[0.0], got[256.0]):
        pd.testing.assert_frame_equal(a, b, check_dtype=False)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_shared_feedback_keys_give_one_yes_per_key_across_replicas(ray_cluster):
    """The application's FeedbackKeys actor (what every replica claims through): handles made by two
    replicas reach one actor; racing claims of one key get exactly one True; an event (a group of
    keys) sharing any key with a claimed one is a duplicate and records nothing; released keys can be
    claimed again; the oldest keys go beyond its capacity. (A handle waits for the actor to be up: a
    claim racing the actor's process start on a busy box timed out in one fresh-clone run.)"""
    from concurrent.futures import ThreadPoolExecutor

    import ray

    from bundlerec.serving.dedup import SharedKeys

    a, b = SharedKeys("test-app", capacity=1000), SharedKeys("test-app", capacity=1000)  # two replicas' handles
    keys = [bytes([i]) * 16 for i in range(50)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda h: h.claim([[k] for k in keys]), [a, b] * 4))
    assert all(x is not None for x in answers)
    assert [sum(ans[i] for ans in answers) for i in range(len(keys))] == [1] * len(keys)  # one yes per key
    a.release(keys[:5])
    assert b.claim([[k] for k in keys[:6]]) == [True] * 5 + [False]
    # a second purchase of a bought item under another event id: the group shares its purchase key
    buy, again, other = [b"e" * 16, b"p" * 16], [b"f" * 16, b"p" * 16], [b"g" * 16, b"q" * 16]
    assert a.claim([buy]) == [True] and b.claim([again, other]) == [False, True]
    assert b.claim([[b"f" * 16]]) == [True]  # nothing of the refused group was recorded
    small = SharedKeys("other-app", capacity=3)
    assert small.claim([[b"1" * 16], [b"2" * 16], [b"3" * 16], [b"4" * 16]]) == [True] * 4
    assert small.claim([[b"1" * 16], [b"4" * 16]]) == [True, False]  # "1" was dropped (oldest)
    assert ray.get(a.actor.size.remote()) == 55
    for h in (a, small):
        ray.kill(h.actor, no_restart=True)
