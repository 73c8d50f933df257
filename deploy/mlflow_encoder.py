"""MLflow pyfunc wrapper of an lmforge dual encoder and its index (task `align`), logged as "models from code"
(nothing is pickled).

`mlflow.pyfunc.load_model("models:/lmforge-encoder@champion").predict(["parse an email address"])` returns, per
query, the top items of the index (score, qualified name, file, line, snippet) in the version's served mode
(`params={"k": 10, "mode": "dense" | "bm25" | "hybrid"}` override it). The registered version holds the encoder
(`artifacts/encoder/`) and the index built with it (`artifacts/index/`).
"""

from mlflow.pyfunc import PythonModel

import mlflow


class LMForgeSearch(PythonModel):
    def load_context(self, context):
        from models.dual_encoder import load_encoder
        from models.search_index import SearchIndex

        self.encoder = load_encoder(context.artifacts["encoder"])
        self.index = SearchIndex.load(context.artifacts["index"])

    def predict(self, context, model_input: list[str], params=None) -> list[list[dict]]:
        params = params or {}
        k, mode = int(params.get("k", 10)), params.get("mode", "hybrid")
        queries = list(model_input)
        vectors = self.encoder.embed(queries, "text")
        return [self.index.search(q, v, k, mode) for q, v in zip(queries, vectors)]


mlflow.models.set_model(LMForgeSearch())
