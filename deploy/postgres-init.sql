-- Least-privilege roles and databases of the stack, idempotent (run it again to rotate passwords).
-- Run by postgres-init.sh at the first start of the PostgreSQL container, as the admin (POSTGRES_USER), with
-- the passwords as psql variables: prefect_password, mlflow_password, writer_password, label_studio_password.
--   prefect            owns the `prefect` database (Prefect's server)
--   mlflow             owns `mlflow` and `mlflow_auth` (MLflow's tracking and auth stores)
--   predictions_writer may only connect to `predictions` and create and write tables there (the sinks)
--   label_studio       owns `label_studio` (the reviewers' Label Studio, docs/review.md)
\set ON_ERROR_STOP on

SELECT format('CREATE ROLE %I LOGIN', r) FROM unnest(ARRAY['prefect', 'mlflow', 'predictions_writer', 'label_studio']) AS r
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) \gexec
ALTER ROLE prefect WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'prefect_password';
ALTER ROLE mlflow WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'mlflow_password';
ALTER ROLE predictions_writer WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'writer_password';
ALTER ROLE label_studio WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'label_studio_password';

SELECT format('CREATE DATABASE %I', d) FROM unnest(ARRAY['prefect', 'mlflow', 'mlflow_auth', 'predictions', 'label_studio']) AS d
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = d) \gexec
ALTER DATABASE prefect OWNER TO prefect;
ALTER DATABASE mlflow OWNER TO mlflow;
ALTER DATABASE mlflow_auth OWNER TO mlflow;
ALTER DATABASE label_studio OWNER TO label_studio;

-- Nobody connects to a database that is not theirs.
REVOKE ALL ON DATABASE prefect, mlflow, mlflow_auth, predictions, label_studio FROM PUBLIC;
GRANT CONNECT ON DATABASE predictions TO predictions_writer;

\connect predictions
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO predictions_writer;
