"""HTTP request/response schema of the recommendation endpoint (the Serve side of bundlerec.data.schema).

Event types and field names are the ones prep validates, so a live session sent to the endpoint
looks exactly like a clickstream row.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bundlerec.bundles.generate import BundleConstraints
from bundlerec.pricing.demand import PriceLimits
from bundlerec.data.schema import EVENT_TYPES

_BUNDLE = BundleConstraints()  # bundle defaults: one definition

MAX_K = 100
MAX_EVENTS = 512
ID_PATTERN = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"  # user and item ids: no control characters, not blank

EventType = Literal[EVENT_TYPES]  # type: ignore[valid-type]  # view | click | cart | purchase


EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN)
    event_type: EventType
    event_time: datetime

    @field_validator("event_time")
    @classmethod
    def _plausible_time(cls, t: datetime) -> datetime:
        return plausible_time(t)


def plausible_time(t: datetime) -> datetime:
    """From 1970 to a day ahead (clock skew), as prep accepts; naive times are UTC."""
    t = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    if not EARLIEST <= t <= datetime.now(timezone.utc) + timedelta(days=1):
        raise ValueError("event_time must lie between 1970-01-01 and a day from now")
    return t


_EVENTS_EXAMPLE = [{"item_id": "I000001", "event_type": "view", "event_time": "2026-03-01T10:00:00Z"},
                   {"item_id": "I000002", "event_type": "cart", "event_time": "2026-03-01T10:05:00Z"}]


class RecommendationRequest(BaseModel):
    """Either ``user_id`` (history from the training snapshot) or ``events`` (a live session)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"user_id": "U0000001", "k": 10}, {"events": _EVENTS_EXAMPLE, "k": 5}]})
    user_id: Optional[str] = Field(default=None, min_length=1, max_length=128, pattern=ID_PATTERN)
    events: Optional[list[Event]] = Field(default=None, max_length=MAX_EVENTS)
    k: int = Field(default=10, ge=1, le=MAX_K, strict=True)
    session_id: Optional[str] = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$",
                                      description="an anonymous shopper's session: send back the session_id of "
                                                  "the first answer to keep the same experiment arm")
    as_of: Optional[datetime] = Field(default=None, description="with events: the moment their ages are measured "
                                      "from (default: now), to replay a logged session as the evaluation scored it")

    @field_validator("as_of")
    @classmethod
    def _plausible_as_of(cls, t: Optional[datetime]) -> Optional[datetime]:
        return None if t is None else plausible_time(t)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.user_id is None) == (self.events is None):
            raise ValueError("give exactly one of user_id or events")
        return self

    @model_validator(mode="after")
    def _as_of_with_events(self):
        if self.as_of is not None and self.events is None:
            raise ValueError("as_of applies to events only")
        return self


class BundleRequest(RecommendationRequest):
    """Same history sources as recommendations, a free-text ``query``, or a query together with a
    history, plus the bundle constraints."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"user_id": "U0000001", "n": 3, "max_size": 4}, {"query": "a camping starter kit", "budget": 300.0},
        {"query": "a gift for a runner", "events": _EVENTS_EXAMPLE, "max_discount": 0.3, "price_ending": 0.99}]})
    query: Optional[str] = Field(default=None, min_length=1, max_length=512,
                                 description='a shopping intent, e.g. "a camping starter kit": alone it seeds the '
                                             'bundles; with user_id or events it is combined with that history')

    @model_validator(mode="after")
    def _one_source(self):
        if self.user_id is not None and self.events is not None:
            raise ValueError("give at most one of user_id or events")
        if self.user_id is None and self.events is None and self.query is None:
            raise ValueError("give user_id, events or query (a query may come with user_id or events)")
        if self.query is not None and not self.query.strip():
            raise ValueError("query needs some text")
        return self

    n: int = Field(default=_BUNDLE.n, ge=1, le=10, strict=True, description="bundles to return")
    max_size: int = Field(default=_BUNDLE.max_size, ge=2, le=8, strict=True, description="items per bundle, at most")
    budget: Optional[float] = Field(default=None, gt=0, allow_inf_nan=False, description="maximum list price of a bundle")
    allow_repeats: bool = Field(default=_BUNDLE.allow_repeats, strict=True, description="allow an item in several bundles")
    max_discount: float = Field(default=_BUNDLE.limits.max_discount, ge=0, le=1, allow_inf_nan=False,
                                description="at most this share off a bundle's list price")
    min_margin: float = Field(default=_BUNDLE.limits.min_margin, ge=0, le=100, allow_inf_nan=False,
                              description="price >= the items' catalog cost x (1 + min_margin); bundles whose "
                                          "items lack a cost are returned unpriced")
    price_ending: Optional[float] = Field(default=_BUNDLE.limits.price_ending, ge=0, lt=1, allow_inf_nan=False,
                                          description="cents every bundle price ends in, e.g. 0.99")

    def limits(self) -> PriceLimits:
        return PriceLimits(self.max_discount, self.min_margin, self.price_ending)


class CompletionRequest(BaseModel):
    """The items already in a cart or a started bundle; the answer completes it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"items": ["I000001", "I000002"], "k": 10}]})
    items: list[Annotated[str, Field(min_length=1, max_length=128, pattern=ID_PATTERN)]] = Field(
        min_length=1, max_length=MAX_EVENTS, description="item ids of the cart (order does not matter)")
    k: int = Field(default=10, ge=1, le=MAX_K, strict=True)
    user_id: Optional[str] = Field(default=None, min_length=1, max_length=128, pattern=ID_PATTERN,
                                   description="the shopper, for the experiment arm (the cart alone decides the answer)")
    session_id: Optional[str] = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$",
                                      description="an anonymous shopper's session: send back the session_id of "
                                                  "the first answer to keep the same experiment arm")


class BundleItem(BaseModel):
    item_id: str
    title: str
    price: Optional[float] = None
    reason: str


class Bundle(BaseModel):
    name: str
    score: float
    items: list[BundleItem]
    list_price: Optional[float] = None
    bundle_price: Optional[float] = None
    discount: Optional[float] = None
    expected_revenue: Optional[float] = None
    expected_revenue_separately: Optional[float] = None
    offer: Optional[str] = Field(default=None, description='"bundle": the bundle at bundle_price (its expected revenue, or '
                                 'margin with item costs, beats selling the items separately); "separately": no discount, '
                                 'the items at their own prices (a discount would earn less); null: not priced')
    offer_reason: Optional[str] = Field(default=None, description="both expected figures behind the offer")
    optimal_price: Optional[float] = Field(default=None, description="under a pricing policy that explores: the "
                                           "pricing model's optimum, around which bundle_price was drawn (the "
                                           "list price where the model would sell the items separately)")
    price_propensity: Optional[float] = Field(default=None, description="under a pricing policy that explores: the "
                                              "probability with which bundle_price was drawn (1: not explored)")
    price_source: str = Field(description='"feedback": the demand model refitted on this shop\'s offers and '
                                          'feedback (jobs.fit_demand); "transferred": the model fitted elsewhere '
                                          '(the Steam bundles) and applied to this catalog (GET /v1/model has the '
                                          'fit metadata of either); "default": no fitted model, a fixed optimal '
                                          'discount is assumed; '
                                          '"none (...)": not priced, with the reason (no item prices, no price meets '
                                          'the request\'s limits, min_margin without item costs)')


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    title: str
    price: Optional[float] = None


class ModelInfo(BaseModel):
    name: str
    version: Optional[str] = None
    alias: Optional[str] = None
    uri: str


class ArmInfo(BaseModel):
    experiment: str
    arm: str


class Impression(BaseModel):
    """What every recommendation and bundle answer carries for feedback and experiments."""

    impression_id: str = Field(description="send it with POST /v1/feedback")
    experiment: Optional[ArmInfo] = Field(default=None, description="the running experiment and this shopper's arm")
    session_id: Optional[str] = Field(default=None, description="the assignment unit of an anonymous shopper")


class RecommendationResponse(Impression):
    items: list[RecommendedItem]
    cold_start: bool = Field(description="no usable history: the answer is the most popular items")
    unknown_items: list[str] = Field(default_factory=list, description="request items not in the catalog (ignored)")
    history_source: str
    model: ModelInfo


class CompletingItem(RecommendedItem):
    reason: str


class CompletionResponse(Impression):
    items: list[CompletingItem] = Field(description="the items that complete the cart, best first (cart items excluded)")
    unknown_items: list[str] = Field(default_factory=list, description="cart items not in the catalog (ignored)")
    model: ModelInfo


class BundleResponse(Impression):
    bundles: list[Bundle]
    cold_start: bool
    unknown_items: list[str] = Field(default_factory=list)
    history_source: str
    model: ModelInfo


class UserSample(BaseModel):
    users: list[str] = Field(description="user ids of the model's data snapshot that have a history")


class HistoryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"user_id": "U0000001"}]})
    user_id: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN)


class HistoryEvent(BaseModel):
    item_id: str
    title: str
    price: Optional[float] = None
    event_type: str
    age_hours: float = Field(description="hours before the snapshot the model was trained on")


class HistoryResponse(BaseModel):
    events: list[HistoryEvent] = Field(description="the history the model reads for this user, oldest first")
    history_source: str
    model: ModelInfo


class ItemSearchResponse(BaseModel):
    items: list[RecommendedItem]
    model: ModelInfo


FeedbackType = Literal["click", "cart", "purchase", "bundle_accept"]
FEEDBACK_EVENT_TYPE = {"click": "click", "cart": "cart", "purchase": "purchase", "bundle_accept": "purchase"}
"""Feedback type -> clickstream event type (an accepted bundle is a purchase of each of its items)."""


class FeedbackEvent(BaseModel):
    """One thing a shopper did with what an answer showed."""

    model_config = ConfigDict(extra="forbid")
    impression_id: str = Field(min_length=10, max_length=2048)  # binds up to 100 shown items (4 bytes each)
    event_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$",
                          description="the client's id of this event: a repeat is counted once")
    type: FeedbackType
    item_id: Optional[str] = Field(default=None, min_length=1, max_length=128, pattern=ID_PATTERN,
                                   description="the item clicked, carted or bought (not for bundle_accept)")
    bundle_index: Optional[int] = Field(default=None, ge=0, le=9, strict=True,
                                        description="bundle_accept: which bundle of the answer (0 = first)")
    items: Optional[list[Annotated[str, Field(min_length=1, max_length=128, pattern=ID_PATTERN)]]] = Field(
        default=None, min_length=1, max_length=8, description="bundle_accept: the bundle's item ids")
    price: Optional[float] = Field(default=None, ge=0, le=1e7, allow_inf_nan=False,
                                   description="purchase: unit price paid (default: the catalog price); "
                                               "bundle_accept: the bundle price paid")
    quantity: int = Field(default=1, ge=1, le=1000, strict=True)
    event_time: Optional[datetime] = Field(default=None, description="when it happened (default: when received)")

    @field_validator("event_time")
    @classmethod
    def _plausible_time(cls, t: Optional[datetime]) -> Optional[datetime]:
        return None if t is None else plausible_time(t)

    @model_validator(mode="after")
    def _fields_of_type(self):
        if self.type == "bundle_accept":
            if self.bundle_index is None or self.items is None or self.price is None or self.item_id is not None:
                raise ValueError("bundle_accept needs bundle_index, items and price (and no item_id)")
        elif self.item_id is None or self.items is not None or self.bundle_index is not None:
            raise ValueError(f"{self.type} needs item_id (and no items or bundle_index)")
        return self


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[FeedbackEvent] = Field(min_length=1, max_length=100)


class FeedbackResponse(BaseModel):
    accepted: int = Field(description="events recorded now")
    duplicates: int = Field(description="events already recorded (same impression_id and event_id, or a purchase of an item this answer's feedback bought already): counted once")


class ErrorResponse(BaseModel):
    detail: str


# Error answers every protected route can give (documented in the OpenAPI schema; 422 is FastAPI's own).
ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "body is not UTF-8, nests deeper than 32 levels or repeats a key"},
    401: {"model": ErrorResponse, "description": "missing bearer token"},
    403: {"model": ErrorResponse, "description": "invalid token"},
    413: {"model": ErrorResponse, "description": "request body too large"},
    415: {"model": ErrorResponse, "description": "body is not application/json"},
    503: {"model": ErrorResponse, "description": "overloaded (Retry-After) or model not loaded"},
}


def feedback_links(item_pointer: str) -> dict:
    """OpenAPI links from an answer to ``POST /v1/feedback`` (a click on its first item, against its
    impression id): the documented way a client goes on, and what schemathesis' stateful phase
    follows. ``item_pointer``: JSON pointer of the first item id in the answer."""
    return {200: {"links": {"ClickOnTheFirstItem": {
        "operationId": "feedback_v1_feedback_post",
        "description": "report a click on the answer's first item",
        "requestBody": {"events": [{"impression_id": "$response.body#/impression_id", "event_id": "click-1",
                                    "type": "click", "item_id": f"$response.body#{item_pointer}"}]}}}}}
