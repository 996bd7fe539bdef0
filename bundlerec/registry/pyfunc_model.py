"""The registered model's code, logged as MLflow "models from code": loading the model runs this file
(from the bundlerec copy logged beside it) instead of unpickling a Python object, so nothing in the
registered model is a pickle (issue 13). The weights and data are the export, verified against its
manifest when :meth:`BundlerecPyfunc.load_context` loads it."""

import mlflow

from bundlerec.registry.pyfunc import BundlerecPyfunc

mlflow.models.set_model(BundlerecPyfunc())
