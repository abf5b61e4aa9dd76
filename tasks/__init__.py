"""Prefect tasks, one per stage: caching (the content-addressed store), retries, tags, and the
loading and saving of artifacts around the plain functions of unlearning_audit."""
