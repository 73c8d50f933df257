"""MLflow pyfunc wrapper of an lmforge extractor (task `kg`), logged as "models from code" (nothing is pickled).

`mlflow.pyfunc.load_model("models:/lmforge-extractor@champion").predict(["Raise ValueError if ..."])` returns, per
text, its entity mentions (span, type, linked entity, scores) and the relations of its subject to them. The
registered version also holds the graph built with it (`artifacts/graph.nt`, N-Triples).
"""

from mlflow.pyfunc import PythonModel

import mlflow


class LMForgeExtractor(PythonModel):
    def load_context(self, context):
        from models.extractor import load_extractor

        self.extractor = load_extractor(context.artifacts["extractor"])

    def predict(self, context, model_input: list[str], params=None) -> list[dict]:
        return self.extractor.extract(list(model_input))


mlflow.models.set_model(LMForgeExtractor())
