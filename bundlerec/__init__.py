"""bundlerec: clickstream logs -> a fine-tuned two-tower model -> priced bundles over HTTP.

For notebooks, :func:`load` gives the object a Serve replica answers with (docs/python-api.md)."""

from __future__ import annotations

from typing import Optional


def load(model_uri: str, tracking_uri: Optional[str] = None, user_key_file: Optional[str] = None):
    """The :class:`~bundlerec.inference.recommender.Recommender` that ``model_uri`` names, loaded the way
    a Serve replica loads it (``bundlerec.serving.loading.load``): an export folder, verified against its
    manifest, or a registered version (``models:/bundlerec@champion``, ``models:/bundlerec/3``) downloaded
    and verified against the digest pinned at registration, no code of it run; then a canned request.
    ``user_key_file``: the key that pseudonymized the export's user ids (``serve.user_key_file``)."""
    from bundlerec.privacy import read_user_key
    from bundlerec.serving.loading import load as load_verified

    return load_verified(model_uri, tracking_uri, user_key=read_user_key(user_key_file) if user_key_file else None).rec
