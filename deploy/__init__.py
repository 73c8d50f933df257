"""Serving (BentoML) and the MLflow pyfunc wrapper of the model bundle."""
