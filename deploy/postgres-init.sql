-- Databases beside `prefect` (created by POSTGRES_DB): MLflow's store, its auth store, and the prediction tables.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE predictions;
