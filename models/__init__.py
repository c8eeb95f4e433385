"""Networks, chosen by `policy.path` in YAML: what each returns is its algorithm's choice (Q-values, quantiles, logits and values)."""
