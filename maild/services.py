"""The long-lived services rules consult (limiter, campaigns, sanctions), set by the daemon.

Rules stay functions of their context: they find these through this module, and unit
tests install their own instances (with an injected clock) the same way. A service left
as None means the feature is not running, and its rules have no opinion.
"""

from __future__ import annotations

from typing import Any

limiter: Any = None
campaigns: Any = None
sanctions: Any = None
optin: Any = None  # maild.optin.service.OptinService
web: Any = None  # maild.web.app.WebService: one-click keys for the policy rule
sessions: Any = None  # maild.smtp.server.SessionCounter: sessions per real client
