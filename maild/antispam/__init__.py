"""Outbound anti-spam state: rate-limit counters, bulk campaigns, sanctions."""
