"""Bundle pricing: a purchase-probability model fitted from data, and a revenue-maximizing price.

Model (documented with its assumptions in docs/pricing.md). A shopper's willingness to pay for a
bundle with list price L (sum of item prices) is ``W = L * exp(mu + eps)``, ``eps ~ Logistic(0, s)``,
with ``mu = theta . x`` linear in bundle features x (size, list price, price concentration, add-on
share such as soundtracks/DLC). The purchase probability at price p is therefore

    P(buy | p) = sigmoid((mu - log(p / L)) / s)

and expected revenue ``p * P(buy | p)`` is maximised at ``log(p*/L) = mu - s * logit(1 - s)``
(s < 1), where P(buy) = 1 - s. Without purchase logs, theta is fitted by *inverse optimisation*:
assuming the observed (seller-chosen) bundle prices are revenue-optimal, the observed log price
ratio is regressed on x (ridge). ``s`` is not identifiable from prices alone; it is an assumption
(default `PricingConfig.s`) that sets the purchase probabilities and revenue figures, not the fitted prices.

Prices are chosen on a grid under constraints (maximum discount, minimum margin over cost,
optional price endings such as .99), so constraints hold exactly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from bundlerec.config import PricingConfig
from bundlerec.pricing.features import FEATURES, PricingContext, bundle_features

@dataclass(frozen=True)
class PriceLimits:
    """A shop's constraints on a bundle price (request knobs; one definition of their defaults)."""

    max_discount: float = 0.6
    """At most this share off the list price."""
    min_margin: float = 0.0
    """The price is at least the items' summed catalog ``cost`` times (1 + min_margin)."""
    price_ending: Optional[float] = None
    """Cents every price ends in, e.g. 0.99."""
    explore: float = 0.0
    """Safe price exploration (a pricing policy's, never a request's): the shown price is drawn
    uniformly from up to :data:`EXPLORE_POINTS` feasible prices within ``explore`` x the list price of
    the optimum, and the answer carries the optimum and the propensity of the price shown."""
    shift: float = 0.0
    """A price policy's move of every price (never a request's): the feasible price nearest to the
    optimum + ``shift`` x the list price (a bundle the model sells separately: at a negative shift,
    offered that far below its list price). A challenger policy whose revenue an off-policy estimate
    reads from an exploring policy's logs (bundlerec.experiments.offpolicy) before anyone sees it."""


EXPLORE_POINTS = 5
"""How many candidate prices an exploring bundle's price is drawn from (fewer where the limits leave
fewer whole-cent prices): a few, so that an off-policy estimate finds its target's prices among them."""


def tightened(limits: PriceLimits, policy: Optional[dict]) -> PriceLimits:
    """A request's limits under a pricing policy (:func:`bundlerec.config.check_price_policy`): the
    smaller maximum discount, the larger minimum margin, the policy's price ending where it sets one."""
    if not policy:
        return limits
    return PriceLimits(min(limits.max_discount, policy.get("max_discount", 1.0)),
                       max(limits.min_margin, policy.get("min_margin", 0.0)),
                       policy.get("price_ending", limits.price_ending), policy.get("explore", limits.explore),
                       policy.get("shift", limits.shift))


class NoFeasiblePrice(ValueError):
    """No price in whole cents meets the limits (e.g. the minimum margin is above the list price)."""

@dataclass
class PricingModel:
    s: float = PricingConfig.s
    """Logistic scale of willingness to pay (an assumption; see module docstring)."""
    seed: int = 0
    regressor: object = None
    """mu(x) learner: gradient-boosted trees with absolute-error loss (the metric we report)."""
    default_discount: float = 0.2
    """Revenue-optimal discount assumed before fitting (the median Steam bundle discount)."""
    context: Optional[PricingContext] = None
    """Earlier bundles for the overlap/seller features (empty context: their fallbacks)."""
    linear: Optional[dict] = None
    """The demand model refitted on the shop's feedback (bundlerec.pricing.feedback): ``theta`` (mu =
    theta . z on its FEEDBACK_FEATURES), ``take_rate`` and its trust region ``min_ratio`` (no price
    below that share of the list price); ``s`` is then fitted, not assumed."""

    def features(self, item_prices, item_names=None, item_genres=None, bundle_name: str = "",
                 item_ids: Optional[Sequence] = None) -> np.ndarray:
        if self.linear is not None:
            from bundlerec.pricing.feedback import demand_features

            return demand_features(item_prices)
        ctx = self.context or PricingContext([], [], {})
        return np.concatenate([bundle_features(item_prices, item_names, item_genres, bundle_name), ctx.features(item_ids)])

    # ---------------------------------------------------------------- fitting
    def fit(self, X: np.ndarray, discount: np.ndarray) -> "PricingModel":
        """Inverse optimisation: learn the revenue-optimal discount (hence mu) from observed prices."""
        from sklearn.ensemble import GradientBoostingRegressor

        self.regressor = GradientBoostingRegressor(loss="absolute_error", n_estimators=200, max_depth=3,
                                                   learning_rate=0.05, subsample=0.8, random_state=self.seed)
        self.regressor.fit(X, np.clip(np.asarray(discount, dtype=float), 0.0, 0.95))
        return self

    # ---------------------------------------------------------------- persistence (no pickle)
    def save(self, out_dir: str, meta: dict) -> None:
        """``pricing.json`` (parameters + fit metadata) and ``pricing.skops`` (the fitted trees in
        skops' format, which loads without executing code)."""
        import json

        import skops.io as sio

        os.makedirs(out_dir, exist_ok=True)
        if self.linear is not None:  # the feedback refit: its parameters are the whole model
            from bundlerec.pricing.feedback import FEEDBACK_FEATURES

            for stale in ("pricing.skops", "pricing_context.json"):  # a transferred model's files
                if os.path.exists(os.path.join(out_dir, stale)):
                    os.remove(os.path.join(out_dir, stale))
            with open(os.path.join(out_dir, "pricing.json"), "w") as f:
                json.dump({**meta, "s": self.s, "source": "feedback", "features": list(FEEDBACK_FEATURES),
                           "linear": self.linear}, f, indent=2)
            return
        if self.regressor is None:
            raise ValueError("only a fitted pricing model is saved (the unfitted default needs no file)")
        sio.dump(self.regressor, os.path.join(out_dir, "pricing.skops"))
        with open(os.path.join(out_dir, "pricing.json"), "w") as f:
            json.dump({"s": self.s, "seed": self.seed, "features": list(FEATURES), **meta}, f, indent=2)
        with open(os.path.join(out_dir, "pricing_context.json"), "w") as f:
            json.dump((self.context or PricingContext([], [], {})).to_json(), f)

    @classmethod
    def load(cls, export_dir: str) -> tuple["PricingModel", dict]:
        """The fitted model of an export and its metadata; ``(PricingModel(), {"source": "default"})``
        when the export has none. Only scikit-learn types are accepted from the file."""
        import json

        import skops.io as sio

        meta_path = os.path.join(export_dir, "pricing.json")
        if not os.path.exists(meta_path):
            return cls(), {"source": "default", "note": f"no fitted pricing model: a fixed {cls.default_discount:.0%} "
                                                        f"optimal discount is assumed (set pricing.data_dir)"}
        meta = json.load(open(meta_path))
        if meta.get("source") == "feedback":
            from bundlerec.pricing.feedback import FEEDBACK_FEATURES

            if list(meta.get("features", [])) != list(FEEDBACK_FEATURES):
                raise ValueError(f"{meta_path}: fitted on other features than this code computes; refit the demand model")
            lin = meta["linear"]
            model = cls(s=float(meta["s"]), linear={"theta": [float(t) for t in lin["theta"]],
                                                     "take_rate": [float(q) for q in lin["take_rate"]],
                                                     "min_ratio": float(lin.get("min_ratio", 0.0))})
            return model, {k: v for k, v in meta.items() if k not in ("features", "linear")}
        if list(meta.get("features", [])) != list(FEATURES):
            raise ValueError(f"{meta_path}: fitted on other features than this code computes; refit the pricing model")
        path = os.path.join(export_dir, "pricing.skops")
        untrusted = sio.get_untrusted_types(file=path)
        foreign = [t for t in untrusted if not t.startswith("sklearn.")]
        if foreign:
            raise ValueError(f"{path} holds types that are not scikit-learn's: {foreign}; refusing to load it")
        model = cls(s=float(meta["s"]), seed=int(meta.get("seed", 0)))
        model.regressor = sio.load(path, trusted=untrusted)
        ctx_path = os.path.join(export_dir, "pricing_context.json")
        if os.path.exists(ctx_path):
            model.context = PricingContext(**json.load(open(ctx_path)))
        # fitted elsewhere (the Steam bundles) and applied to this catalog
        return model, {"source": "transferred", **{k: v for k, v in meta.items() if k not in ("features", "source")}}

    def offset(self) -> float:
        """s * logit(1 - s): how far below mean WTP the revenue-optimal price sits."""
        return self.s * math.log((1 - self.s) / self.s)

    # ---------------------------------------------------------------- demand and prices
    def mu(self, X: np.ndarray) -> np.ndarray:
        """Location of log(WTP / list price) implied by the fitted optimal discount, for each row of
        ``X`` (one model call for all rows: it does not depend on the price asked)."""
        if self.linear is not None:
            return np.atleast_2d(X) @ np.asarray(self.linear["theta"], dtype=float)
        d = self.predict_discount(np.atleast_2d(X))
        return np.log(np.maximum(1.0 - d, 1e-6)) + self.offset()

    def purchase_probability(self, price, list_price, x: Optional[np.ndarray] = None, mu=None):
        """P(buy) at ``price`` (scalar or array, against ``list_price``) for a bundle with features
        ``x``, or with its location ``mu`` already computed (:meth:`mu`)."""
        m = self.mu(x)[0] if mu is None else mu
        z = (m - np.log(np.maximum(np.asarray(price, dtype=float), 1e-9) / np.asarray(list_price, dtype=float))) / self.s
        p = 1.0 / (1.0 + np.exp(-z))
        return float(p) if np.ndim(p) == 0 else p

    def predict_discount(self, X: np.ndarray) -> np.ndarray:
        """Unconstrained revenue-optimal discount for each row of X."""
        if self.linear is not None:  # s >= 1: revenue rises with the price up to the list price
            if self.s >= 1:
                return np.zeros(len(np.atleast_2d(X)))
            return np.clip(1.0 - np.exp(self.mu(X) - self.offset()), 0.0, 0.95)
        if self.regressor is None:
            return np.full(len(X), self.default_discount)
        return np.clip(self.regressor.predict(X), 0.0, 0.95)

    def price(self, item_prices: Sequence[float], item_names: Optional[Sequence[str]] = None,
              item_genres: Optional[Sequence[str]] = None, bundle_name: str = "", costs: Optional[Sequence[float]] = None,
              max_discount: float = PriceLimits.max_discount, min_margin: float = PriceLimits.min_margin,
              price_ending: Optional[float] = PriceLimits.price_ending, grid: int = 400,
              item_ids: Optional[Sequence] = None, compare_separately: bool = True) -> dict:
        """Revenue- (or margin-, when costs are given) maximizing bundle price under constraints, in
        whole cents, each constraint met exactly: ``bundle_price >= list * (1 - max_discount)``,
        ``bundle_price >= sum(costs) * (1 + min_margin)``, ``bundle_price <= list``, and with
        ``price_ending`` (e.g. 0.99) the cents are that ending. Raises :class:`NoFeasiblePrice` when
        no price meets them."""
        out = self.price_many([dict(item_prices=item_prices, item_names=item_names, item_genres=item_genres,
                                    bundle_name=bundle_name, costs=costs, item_ids=item_ids)],
                              max_discount=max_discount, min_margin=min_margin, price_ending=price_ending, grid=grid,
                              compare_separately=compare_separately)[0]
        if isinstance(out, NoFeasiblePrice):
            raise out
        return out

    def price_many(self, bundles: Sequence[dict], max_discount: float = PriceLimits.max_discount,
                   min_margin: float = PriceLimits.min_margin, price_ending: Optional[float] = PriceLimits.price_ending,
                   grid: int = 400, compare_separately: bool = True, explore: float = 0.0,
                   rng: Optional[np.random.Generator] = None, shift: float = 0.0) -> list:
        """:meth:`price` for several bundles (dicts of its per-bundle arguments: ``item_prices`` and
        optionally ``item_names``, ``item_genres``, ``bundle_name``, ``costs``, ``item_ids``) with one
        model call for all of them and their items sold alone; each entry is the price dict, or the
        :class:`NoFeasiblePrice` of that bundle. ``compare_separately=False``: the bundle's best price
        whether or not it beats selling the items separately (``offer`` is then always "bundle").
        ``explore`` > 0 draws an offered bundle's price around its optimum (:attr:`PriceLimits.explore`);
        ``shift`` moves it (:attr:`PriceLimits.shift`)."""
        if not 0 <= max_discount <= 1 or min_margin < 0:
            raise ValueError("max_discount must be in [0, 1] and min_margin >= 0")
        end = None if price_ending is None else int(round(price_ending * 100))
        if end is not None and not 0 <= end < 100:
            raise ValueError("price_ending must be in [0, 1)")
        rows, plans = [], []
        for b in bundles:
            prices = np.asarray(b["item_prices"], dtype=float)
            L = float(prices.sum())
            if not np.isfinite(L) or L <= 0:
                raise ValueError("bundle list price must be positive")
            names, ids = b.get("item_names"), b.get("item_ids")
            rows.append(self.features(prices, names, b.get("item_genres"), b.get("bundle_name", ""), ids))
            # selling separately: each item alone at its own list price, under the same model (n = 1)
            alone = [(float(pi), nm, i) for pi, nm, i in zip(prices, list(names or [""] * len(prices)),
                                                              list(ids or [None] * len(prices))) if pi > 0]
            rows += [self.features([pi], [nm], item_ids=[i] if i else None) for pi, nm, i in alone]
            costs = b.get("costs")
            alone_costs = (np.array([c for pi, c in zip(prices, costs) if pi > 0], dtype=float) if costs is not None
                           else np.zeros(len(alone)))
            plans.append((L, costs, np.array([pi for pi, _, _ in alone]), alone_costs))
        mus = self.mu(np.stack(rows)) if rows else np.zeros(0)
        out, r = [], 0
        for L, costs, alone, alone_costs in plans:
            try:
                best = self._best_price(L, costs, mus[r], alone, mus[r + 1:r + 1 + len(alone)], max_discount,
                                        min_margin, end, grid, alone_costs, compare_separately)
                grid_prices = best.pop("_grid", None)
                out.append(self._explored(best, grid_prices, L, costs, mus[r], explore, rng) if explore > 0
                           else self._shifted(best, grid_prices, L, costs, mus[r], shift) if shift else best)
            except NoFeasiblePrice as e:
                out.append(e)
            r += 1 + len(alone)
        return out

    def _explored(self, best: dict, cand: Optional[np.ndarray], L: float, costs, mu: float, width: float,
                  rng: Optional[np.random.Generator]) -> dict:
        """``best`` with its price drawn uniformly from the feasible grid prices within ``width`` x L of
        the optimum that are nearest to :data:`EXPLORE_POINTS` evenly spaced points of that window (the
        limits hold: they made the grid); ``optimal_price`` and ``price_propensity`` (the probability of the
        price shown) say what was done. A bundle the model would sell separately (at the list price, its
        ``optimal_price``) is explored too, below the list price, selling separately one of the
        choices: a refit then sees how shoppers answer a discount the model did not offer."""
        if cand is None or len(cand) == 0:
            return {**best, "optimal_price": None, "price_propensity": 1.0}
        separately = best["offer"] != "bundle"
        p_star = L if separately else best["bundle_price"]
        window = cand[np.abs(cand - p_star) <= width * L + 1e-9]
        targets = np.linspace(p_star - width * L, p_star + width * L, EXPLORE_POINTS)
        if separately:  # below the list price only; the last point is selling separately
            targets, window = np.linspace(L - width * L, L, EXPLORE_POINTS)[:-1], window[window < L - 0.01 + 1e-9]
        near = list(np.unique(window[np.abs(window[None, :] - targets[:, None]).argmin(axis=1)])) if len(window) else []
        choices = near + [None] if separately else near
        shown = choices[int((rng or np.random.default_rng()).integers(len(choices)))]
        if shown is None:
            return {**best, "optimal_price": round(L, 2), "price_propensity": 1.0 / len(choices)}
        return self._at(best, float(shown), L, costs, mu, "explored: {price:.2f} drawn below the list price, where the "
                        "model sells separately", optimal=round(L, 2) if separately else p_star,
                        propensity=1.0 / len(choices))

    def _shifted(self, best: dict, cand: Optional[np.ndarray], L: float, costs, mu: float, shift: float) -> dict:
        """``best`` at the grid price nearest to its optimum + ``shift`` x L (:attr:`PriceLimits.shift`);
        a bundle sold separately stays so at a shift >= 0."""
        if cand is None or len(cand) == 0:
            return best
        separately = best["offer"] != "bundle"
        centre = L if separately else best["bundle_price"]
        price = float(cand[np.argmin(np.abs(cand - (centre + shift * L)))])
        if separately and price > L - 0.01 + 1e-9:  # the top of the grid: the list price in whole cents
            return {**best, "optimal_price": round(L, 2), "price_propensity": 1.0}
        return self._at(best, price, L, costs, mu, f"price policy: {{price:.2f}}, {shift:+.1%} of the list price from "
                        f"the model's price", optimal=round(L, 2) if separately else centre, propensity=1.0)

    def _at(self, best: dict, price: float, L: float, costs, mu: float, reason: str, optimal: float,
            propensity: float) -> dict:
        """``best`` offered as a bundle at ``price`` instead of its optimum (exploration, a shift): the
        model's figures at that price; ``reason`` (a format of ``price``) replaces the offer reason of a
        bundle the model would sell separately."""
        prob = float(self.purchase_probability(np.array([price]), L, mu=mu)[0])
        cost = float(np.sum(costs)) if costs is not None else 0.0
        sep = best["expected_revenue_separately"]
        moved = {} if best["offer"] == "bundle" else {
            "offer": "bundle", "offer_reason": f"{reason.format(price=price)} ({best['offer_reason']})"}
        return {**best, **moved, "list_price": round(L, 2), "bundle_price": price, "discount": 1 - price / L,
                "purchase_probability": prob, "expected_revenue": price * prob,
                "expected_margin": (price - cost) * prob if costs is not None else None,
                "revenue_lift_vs_separate": float(price * prob / sep - 1) if sep > 0 else None,
                "optimal_price": optimal, "price_propensity": propensity}

    def _best_price(self, L: float, costs, mu: float, alone: np.ndarray, mu_alone: np.ndarray, max_discount: float,
                    min_margin: float, end: Optional[int], grid: int, alone_costs: Optional[np.ndarray] = None,
                    compare_separately: bool = True) -> dict:
        """The best whole-cent price of one bundle (list price ``L``, location ``mu``) on the grid, and
        whether offering it pays: a discounted bundle is offered only where its expected revenue (margin,
        with costs) is above selling the items separately at their own prices under the same model (a
        refit's: this bundle's own curve at its list price, which is how its logs saw the items sold
        separately, so a refit offers the bundle wherever a discount pays);
        otherwise the offer is the items at their own prices (``offer: "separately"``: no bundle price,
        no discount) and ``offer_reason`` gives both figures."""
        cost = float(np.sum(costs)) if costs is not None else 0.0
        floor = float((self.linear or {}).get("min_ratio", 0.0))  # a refit's trust region (pricing.feedback.TRUST)
        lo = max(L * (1 - max_discount), cost * (1 + min_margin), L * floor)
        cents_lo, cents_hi = math.ceil(round(lo * 100, 6)), math.floor(round(L * 100, 6))  # whole cents inside [lo, L]
        if cents_lo > cents_hi:
            raise NoFeasiblePrice(f"no price in whole cents within [{lo:.4f}, {L:.2f}] (minimum margin or maximum discount)")
        cents = np.unique(np.linspace(cents_lo, cents_hi, grid).round().astype(np.int64))
        if end is not None:  # e.g. 0.99 -> x.99 prices inside [lo, L]
            cents = np.unique((cents - end) // 100 * 100 + end)
            cents = cents[(cents >= cents_lo) & (cents <= cents_hi)]
            if len(cents) == 0:
                raise NoFeasiblePrice(f"no price ending in .{end:02d} within [{lo:.2f}, {L:.2f}]")
        cand = cents / 100.0
        prob = self.purchase_probability(cand, L, mu=mu)  # the whole grid at once: mu does not depend on the price
        objective = (cand - cost) * prob
        best = int(np.argmax(objective))
        p_star = float(cand[best])
        if self.linear is not None:  # a refit measured "separately" as this bundle shown at its list price
            at_list = float(self.purchase_probability(np.array([L]), L, mu=mu)[0])
            sep, sep_margin = L * at_list, (L - cost) * at_list
        else:
            p_alone = self.purchase_probability(alone, alone, mu=mu_alone) if len(alone) else np.zeros(0)
            sep = float(np.sum(alone * p_alone))
            sep_margin = float(np.sum((alone - (alone_costs if alone_costs is not None else 0.0)) * p_alone))
        bundle = {"list_price": round(L, 2), "bundle_price": p_star, "discount": 1 - p_star / L,
                  "purchase_probability": float(prob[best]), "expected_revenue": float(p_star * prob[best]),
                  "expected_margin": float(objective[best]) if costs is not None else None,
                  "expected_revenue_separately": sep,
                  "revenue_lift_vs_separate": float(p_star * prob[best] / sep - 1) if sep > 0 else None}
        ours, theirs, what = ((float(objective[best]), sep_margin, "margin") if costs is not None
                              else (bundle["expected_revenue"], sep, "revenue"))
        if p_star >= L or ours > theirs or not compare_separately:
            return {**bundle, "offer": "bundle", "offer_reason": f"expected {what} {ours:.2f} as a bundle at "
                    f"{p_star:.2f}, {theirs:.2f} sold separately", "_grid": cand}
        return {"list_price": round(L, 2), "bundle_price": None, "discount": 0.0, "purchase_probability": None,
                "expected_revenue": sep, "expected_margin": sep_margin if costs is not None else None,
                "expected_revenue_separately": sep, "revenue_lift_vs_separate": 0.0,
                "offer": "separately", "offer_reason": f"no discount: selling the items separately is expected to earn "
                f"{theirs:.2f} ({what}), the best bundle price {p_star:.2f} ({1 - p_star / L:.0%} off) {ours:.2f}",
                "_grid": cand}
