"""Integrations with other frameworks, each behind an optional extra and imported only by name
(`lfm2vl_jax.integrations.ray`: Ray Data replicas of the batch engine, the 'ray' extra)."""
