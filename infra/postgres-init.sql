-- Postgres starts with the `prefect` database (POSTGRES_DB); MLflow's tracking store gets its own.
CREATE DATABASE mlflow;
