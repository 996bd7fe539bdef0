"""Sessionization, per-user sequences and the leakage-safe temporal split.

event -> session -> sequence -> example:

* a new session starts when the user changes, the source session id changes, or the user was
  inactive for more than ``session_gap_minutes``;
* a *basket* is the set of target events (purchases by default) of one session; its time is the
  time of its first target event;
* the split (``data.split``):

  - ``per_user`` (default): per user, baskets in time order: the last ``test_baskets`` go to
    ``test``, the ``val_baskets`` before them to ``val``, the rest to ``train`` (one training
    example per target item). Each user's test basket is later than their own training baskets,
    but other users' training baskets may be later than it (prep reports how many:
    ``manifest["split"]["train_after_test_cutoff"]``);
  - ``global_time``: one pair of cutoffs for every user (``cutoffs``: quantiles of the target
    events' times, :func:`global_cutoffs`): baskets whose last purchase is before the validation
    cutoff are ``train``, before the test cutoff ``val``, the rest ``test``. Every training example (its target and
    its whole history) and every statistic computed from the training split lies before the
    validation cutoff;
* an example's input history is the user's last ``history_len`` events **strictly before** the
  basket time, so nothing from the future is ever an input;
* one extra ``latest`` row per user holds the most recent history (what serving looks up).

Runs inside ``map_batches`` on blocks that hold all rows of their users (repartitioned by user).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bundlerec.data.schema import EVENT_TYPE_ID

SPLITS = ("train", "val", "test", "latest")
COLD = "cold"  # a basket with no earlier event of its user: one row each, counted by prep, never written


def assign_sessions(df: pd.DataFrame, gap_s: float) -> np.ndarray:
    """Session number per row of ``df`` (sorted by user, time). Shape (len(df),)."""
    ts = df["_ts"].to_numpy()
    user = df["user_id"].to_numpy()
    new = np.ones(len(df), dtype=bool)
    if len(df) > 1:
        new[1:] = (user[1:] != user[:-1]) | (np.diff(ts) > gap_s)
        sid = df["session_id"]
        has = sid.notna().to_numpy()
        s = sid.astype("string").fillna("").to_numpy()
        new[1:] |= has[1:] & has[:-1] & (s[1:] != s[:-1])
    return np.cumsum(new)


def global_cutoffs(target_times_s: np.ndarray, val_fraction: float, test_fraction: float) -> tuple[float, float]:
    """(validation cutoff, test cutoff) in epoch seconds: the times before which ``1 - val_fraction -
    test_fraction`` and ``1 - test_fraction`` of the target events happened."""
    t = np.sort(np.asarray(target_times_s, dtype=np.float64))
    if not len(t):
        raise ValueError("no target events to place the global_time cutoffs")
    return (float(np.quantile(t, 1.0 - val_fraction - test_fraction)), float(np.quantile(t, 1.0 - test_fraction)))


def build_examples(batch: pd.DataFrame, item_index: dict, gap_minutes: float, history_len: int,
                   target_event: str, val_baskets: int, test_baskets: int,
                   cutoffs: tuple[float, float] | None = None) -> pd.DataFrame:
    """Turn all events of some users into split-tagged examples (see module docstring).
    ``cutoffs``: (validation, test) times in epoch seconds for the ``global_time`` split; None = per user."""
    cols = ["user_id", "split", "target_time", "targets", "hist_items", "hist_types", "hist_age_hours",
            "n_events", "n_sessions"]
    if batch.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    df = batch.copy()
    df["_ts"] = df["event_time"].astype("datetime64[us, UTC]").astype("int64") / 1e6  # seconds
    df["_order"] = np.arange(len(df))
    df = df.sort_values(["user_id", "_ts", "_order"], kind="stable").reset_index(drop=True)
    df["_sess"] = assign_sessions(df, gap_minutes * 60.0)
    item_idx = df["item_id"].map(item_index).to_numpy(dtype=np.int64)
    types = df["event_type"].map(EVENT_TYPE_ID).to_numpy(dtype=np.int64)
    ts = df["_ts"].to_numpy()
    is_target = (df["event_type"] == target_event).to_numpy()
    rows = []
    bounds = np.flatnonzero(np.r_[True, df["user_id"].to_numpy()[1:] != df["user_id"].to_numpy()[:-1], True])
    sess = df["_sess"].to_numpy()
    users = df["user_id"].to_numpy()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        uid = users[lo]
        u_ts, u_items, u_types = ts[lo:hi], item_idx[lo:hi], types[lo:hi]

        def history(t_cut: float):
            end = int(np.searchsorted(u_ts, t_cut, side="left"))  # strictly before t_cut
            start = max(0, end - history_len)
            return (u_items[start:end].tolist(), u_types[start:end].tolist(),
                    ((t_cut - u_ts[start:end]) / 3600.0).tolist())

        tmask = is_target[lo:hi]
        baskets = []  # (time, [items]) in time order
        if tmask.any():
            t_sess = sess[lo:hi][tmask]
            t_ts = u_ts[tmask]
            t_items = u_items[tmask]
            for s in np.unique(t_sess):
                m = t_sess == s
                items = list(dict.fromkeys(t_items[m].tolist()))  # unique, first-seen order
                baskets.append((float(t_ts[m].min()), items, float(t_ts[m].max())))
        nb = len(baskets)
        n_test = min(test_baskets, max(0, nb - 1))  # keep >= 1 basket for training
        n_val = min(val_baskets, max(0, nb - 1 - n_test))
        for b, (t_cut, items, t_end) in enumerate(baskets):
            if cutoffs is not None:  # by the basket's last purchase: a basket across a cutoff is the later split
                split = "test" if t_end >= cutoffs[1] else "val" if t_end >= cutoffs[0] else "train"
            else:
                split = "test" if b >= nb - n_test else "val" if b >= nb - n_test - n_val else "train"
            h_items, h_types, h_age = history(t_cut)
            if not h_items:  # no input to condition on (the user's first events): counted, not an example
                rows.append((uid, COLD, t_cut, items, [], [], [], hi - lo, 0))
                continue
            targets = [[i] for i in items] if split == "train" else [items]
            for tg in targets:
                rows.append((uid, split, t_cut, tg, h_items, h_types, h_age, hi - lo, 0))
        end_t = float(u_ts[-1]) + 1.0
        h_items, h_types, h_age = history(end_t)
        rows.append((uid, "latest", end_t, [], h_items, h_types, h_age, hi - lo,
                     int(np.unique(sess[lo:hi]).size)))
    out = pd.DataFrame(rows, columns=cols)
    out["target_time"] = pd.to_datetime(out["target_time"], unit="s", utc=True).astype("datetime64[us, UTC]")
    return out
