"""What the demo shows once the endpoint is up: one real request for recommendations and one for a
bundle, printed for the reader (user ids redacted) and returned for summary.json."""

from __future__ import annotations

import json
from typing import Optional

from bundlerec.config import PipelineConfig


def sample_request(cfg: PipelineConfig, k: int = 5) -> dict:
    """A real user of the test split: their id plus k (the response lists items under "items")."""
    from bundlerec.data.examples import load_split

    test = load_split(cfg.data.output_dir, "test")
    return {"user_id": str(test.user_id.iloc[0]), "k": k}


def try_endpoint(cfg: PipelineConfig, serve_url: str, token: Optional[str]) -> dict:
    """POST /v1/recommendations and /v1/bundles for a real user; print both; return the summary keys."""
    from bundlerec.client import http_json
    from bundlerec.privacy import redact

    body = sample_request(cfg)
    response = http_json(f"{serve_url}/v1/recommendations", body, token=token)
    shown = redact(body)  # logs never hold a user id in clear
    print(f"POST {serve_url}/v1/recommendations {json.dumps(shown)}\n{json.dumps(response, indent=2)}", flush=True)
    bundle_body = {**body, "n": 1, "max_size": 3}
    bundle = http_json(f"{serve_url}/v1/bundles", bundle_body, token=token)
    for b in bundle["bundles"][:1]:
        print(f"\nbundle for {shown['user_id']}: {b['name']} -- list {b['list_price']}, bundle price "
              f"{b['bundle_price']} ({(b['discount'] or 0):.0%} off; {b.get('offer_reason') or b['price_source']})", flush=True)
        for it in b["items"]:
            print(f"  - {it['title']} ({it['price']}): {it['reason']}", flush=True)
    return {"serve_url": f"{serve_url}/v1/recommendations", "sample_request": body, "sample_response": response,
            "bundles_url": f"{serve_url}/v1/bundles", "sample_bundle_request": bundle_body,
            "sample_bundle": bundle["bundles"][0] if bundle["bundles"] else None}


def try_bundle_endpoint(eval_dir: str, serve_url: str, token: Optional[str]) -> dict:
    """The served engine of a bundle source, asked as its evaluation asked it: a held-out session's
    first annotated bundle as purchase events -> POST /v1/bundles, and its first item ->
    POST /v1/bundles/complete; both printed; returns the summary keys."""
    from bundlerec.bundles.intent import load
    from bundlerec.client import http_json

    domain = next(iter(load(eval_dir).values()))
    first = domain.bundles.sort_values("bundle_id").iloc[0]
    items = [str(i) for i in first["items"]]
    events = [{"item_id": i, "event_type": "purchase", "event_time": "2014-01-01T00:00:00Z"} for i in items]
    body = {"events": events, "as_of": "2014-01-01T00:00:00Z", "n": 2, "max_size": 4}  # asked at the purchase time
    bundles = http_json(f"{serve_url}/v1/bundles", body, token=token)
    print(f"POST {serve_url}/v1/bundles (a held-out {domain.name} shopper's first bundle as purchases):", flush=True)
    for b in bundles["bundles"]:
        print(f"  {b['name']}: " + "; ".join(it["title"][:40] for it in b["items"]) +
              f" (list {b['list_price']}, bundle {b['bundle_price']})", flush=True)
    complete_body = {"items": items[:1], "k": 5}
    completion = http_json(f"{serve_url}/v1/bundles/complete", complete_body, token=token)
    print(f"POST {serve_url}/v1/bundles/complete {json.dumps(complete_body)}: " +
          "; ".join(it["title"][:40] for it in completion["items"]), flush=True)
    return {"bundles_url": f"{serve_url}/v1/bundles", "sample_bundle_request": body,
            "sample_bundle": bundles["bundles"][0] if bundles["bundles"] else None,
            "complete_url": f"{serve_url}/v1/bundles/complete", "sample_completion": completion}
