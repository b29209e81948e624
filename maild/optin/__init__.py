"""Opt-in list evidence: who consented to which list, provably, and enforcement of it.

The AUP allows opt-in mailing lists "where it can be proved that subscribers did opt-in
and that a suitable opt-out mechanism is available", and asks for evidence of consent
within 72 hours. No list manager keeps proof that would stand up (Mailman deletes its
pending token on use and the member row on unsubscribe), so maild keeps its own ledger:
append-only consent events, hash-chained per list, with the raw request messages.

Modules: settings ([optin] in policies.toml), model (events and derived states), chain
(the hash chain), ledger (the store), registry (registered lists), detect (what is list
mail), reports (ARF complaints, DSN bounces), messages (mail maild sends), actions
(request, revoke: shared by CLI and daemon), service (the daemon's cache), evidence
(bundles and verification), cli. The proxy rules are in maild/policy/optin.py.
"""
