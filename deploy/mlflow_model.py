"""MLflow pyfunc wrapper of an lmforge bundle, logged as "models from code" (nothing is pickled).

`mlflow.pyfunc.load_model("models:/lmforge-classifier@champion").predict(["def f(): ..."])`
returns one prediction (label + class probabilities) per text.
"""

from mlflow.pyfunc import PythonModel
from pydantic import BaseModel

import mlflow


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class LMForgeClassifier(PythonModel):
    def load_context(self, context):
        from models.bundle import load_bundle

        self.bundle = load_bundle(context.artifacts["bundle"], with_lm=False)

    def predict(self, context, model_input: list[str], params=None) -> list[Prediction]:
        return [Prediction(label=p.label, probabilities=p.probabilities) for p in self.bundle.classify(model_input)]


mlflow.models.set_model(LMForgeClassifier())
