"""Prefect tasks, one per stage: caching (the content-addressed store), retries, pools, and the
loading and saving of artifacts around the plain functions of unlearning_audit."""
