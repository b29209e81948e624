"""Customers kept outside policies.toml ([customer_source]) and the index every lookup uses."""
