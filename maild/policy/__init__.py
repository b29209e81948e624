"""Policy rules, one module per rule family, run by one pipeline at each SMTP stage."""
