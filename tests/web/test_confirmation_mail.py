"""The confirmation mail with [web]: it links maild's page; the stored copy keeps no token."""

from __future__ import annotations

import email
import email.policy

from maild.optin import messages
from maild.optin.settings import section
from maild.optin.tokens import new_token, token_hash
from maild.smtp.submit import as_bytes
from maild.web.settings import confirm_url
from tests.web.conftest import web_config


def test_link_to_the_page_and_no_token_in_the_stored_copy_even_on_a_long_line():
    config = web_config(base_url="https://a-rather-long-host-name.lists.example.net/maild/web")
    lst = section(config).lists[0]
    token = new_token()
    url = confirm_url(config, token)
    msg, _ = messages.confirmation(
        lst,
        "bob@example.org",
        token,
        confirm_local="confirm",
        hostname="mx.hosted.example",
        when="2024-03-01T10:00:00",
        expires="2024-03-04T10:00:00",
        confirm_url=url,
    )
    body = msg.get_content()
    assert f"    {url}\n" in body and "only its button, or your reply, counts" in body
    assert f"confirm+{token}@lists.hosted.example" in body  # the reply still works
    stored = messages.redacted(msg, token)
    decoded = email.message_from_bytes(stored, policy=email.policy.default)
    assert token not in decoded.get_content() and token not in str(decoded["Reply-To"])
    assert token.encode() not in stored.replace(b"=\n", b"").replace(b"=\r\n", b"")
    assert f"TOKEN-SHA256-{token_hash(token)[:32]}" in decoded.get_content()
    assert token.encode() in as_bytes(msg).replace(b"=\r\n", b"").replace(b"=\n", b"")
