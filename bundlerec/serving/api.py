"""The FastAPI app every route of the deployment is declared on (:mod:`bundlerec.serving.app` and the
explorer's routes in :mod:`bundlerec.serving.explorer`), with the body limit, the request metrics and
the validation-error handler as middleware."""

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from bundlerec.serving import metrics as serve_metrics  # a module reference: the replica sets METRICS
from bundlerec.serving.guards import limit_body, validation_error

api = FastAPI(title="bundlerec", version="0.1.0",
              description="Personalized recommendations and priced bundles from the bundlerec champion model.")
api.middleware("http")(limit_body)
api.middleware("http")(serve_metrics.record_request)  # added last: outermost, so refusals are counted too
api.exception_handler(RequestValidationError)(validation_error)
