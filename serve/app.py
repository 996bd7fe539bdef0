"""The bundlerec Serve application, for `serve run` from the project root.

The deployment itself lives in the library (:mod:`bundlerec.serving.app`); ``serve/config.yaml``
points at its builder, so a cluster needs only the installed package, not this folder.

    serve run serve/config.yaml                        # the config (registry alias, guards, autoscaling)
    serve run serve.app:app model_uri=runs/demo/export # one local export, ServeConfig's defaults
"""

from bundlerec.serving.app import BundlerecService, build_app  # noqa: F401  (re-exported)


def app(args: dict):
    """``serve run serve.app:app key=value ...``: build_app with the command-line args."""
    return build_app(args)
