#!/bin/sh
# First start of the PostgreSQL container: the stack's roles and databases (postgres-init.sql), with passwords
# from the environment (never written to a file).
set -eu
psql --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v prefect_password="$PREFECT_DB_PASSWORD" \
  -v mlflow_password="$MLFLOW_DB_PASSWORD" \
  -v writer_password="$PREDICTIONS_DB_PASSWORD" \
  -v label_studio_password="$LABEL_STUDIO_DB_PASSWORD" \
  -f /etc/cnn/postgres-init.sql
