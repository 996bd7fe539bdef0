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
    from bundlerec.serving.deploy import http_json
    from bundlerec.privacy import redact

    body = sample_request(cfg)
    response = http_json(f"{serve_url}/v1/recommendations", body, token=token)
    shown = redact(body)  # logs never hold a user id in clear
    print(f"POST {serve_url}/v1/recommendations {json.dumps(shown)}\n{json.dumps(response, indent=2)}", flush=True)
    bundle_body = {**body, "n": 1, "max_size": 3}
    bundle = http_json(f"{serve_url}/v1/bundles", bundle_body, token=token)
    for b in bundle["bundles"][:1]:
        print(f"\nbundle for {shown['user_id']}: {b['name']} -- list {b['list_price']}, bundle price "
              f"{b['bundle_price']} ({(b['discount'] or 0):.0%} off)", flush=True)
        for it in b["items"]:
            print(f"  - {it['title']} ({it['price']}): {it['reason']}", flush=True)
    return {"serve_url": f"{serve_url}/v1/recommendations", "sample_request": body, "sample_response": response,
            "bundles_url": f"{serve_url}/v1/bundles", "sample_bundle_request": bundle_body,
            "sample_bundle": bundle["bundles"][0] if bundle["bundles"] else None}
