-- compose.yaml: the postgres image creates role $POSTGRES_USER and database `mlflow`; this adds `prefect`.
CREATE DATABASE prefect;
