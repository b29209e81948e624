"""The pipeline needs no SMTP server: a second front end (as a milter would drive it)
runs whole transactions through maild.policy with aiosmtpd unimportable.

The front end below is all a milter needs: it builds the context from what its MTA
tells it (client, sender, recipients, message), asks the pipeline at each stage and
answers its MTA; services are passed in (ctx.services), never found in module globals.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import asyncio, importlib, json, pkgutil, sys

    BLOCKED = ("aiosmtpd", "maild.smtp.server", "maild.smtp.proxy", "maild.smtp.compat",
               "maild.smtp.data", "maild.smtp.hooks", "maild.smtp.xforward",
               "maild.smtp.sessions", "maild.smtp.own_headers", "maild.smtp.received")

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{name} is blocked: the pipeline must not need it")
            return None

    sys.meta_path.insert(0, Blocker())
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker does not block")

    import maild.policy as pkg
    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"maild.policy.{m.name}")

    from maild.address import parse_path
    from maild.antispam.campaigns import Campaigns
    from maild.antispam.limiter import Limiter
    from maild.config import parse
    from maild.policy import headers
    from maild.policy.chain import CHECK_DEFAULTS
    from maild.policy import pipeline
    from maild.policy.context import Client, Context, Message
    from maild.policy.customer import resolve
    from maild.policy.services import Services

    # A second front end builds its own wiring: here, [headers] is the one section it uses.
    CONFIG = parse({
        "server": {"hostname": "mx.hosted.example"},
        "postmaster": {"domains": ["hosted.example"]},
        "headers": {"checks": {"sender-domain-unknown": "off", "from-domain-unknown": "off"}},
        "customers": [{"name": "acme", "networks": ["192.0.2.0/24"],
                       "domains": ["acme.example"]}],
    }, sections={"headers": lambda r: headers.parse_headers(r, CHECK_DEFAULTS)},
       customer_keys={"headers": lambda r: headers.parse_customer_headers(r, CHECK_DEFAULTS)})
    SERVICES = Services(limiter=Limiter(), campaigns=Campaigns())


    class MilterFrontEnd:
        """connect/helo -> envfrom -> envrcpt* -> eom, as libmilter calls a filter."""

        def __init__(self, addr, helo):
            self.client = Client(addr=addr, name="client.example", helo=helo, proto="ESMTP")
            self.replies = []

        async def envfrom(self, sender):
            self.ctx = Context(config=CONFIG, session_id="MILTER1", client=self.client,
                               sender=parse_path(sender), services=SERVICES)
            self.ctx.identity = resolve(CONFIG, self.client, sender=self.ctx.sender)
            await pipeline.mail(self.ctx)  # a refusal waits for RCPT (smtpd_delay_reject)

        async def envrcpt(self, rcpt):
            addr = parse_path(rcpt)
            v = await pipeline.rcpt(self.ctx, addr)
            if v.accepted:  # the MTA takes the recipient: this front end relays nothing
                pipeline.rcpt_done(self.ctx, addr, v, relayed=True)
            self.replies.append(v.reply)

        async def eom(self, content):
            v = await pipeline.data(self.ctx, Message(content))
            pipeline.finish(self.ctx, accepted=v.accepted)
            self.replies.append(v.reply if not v.accepted else "continue")


    MESSAGE = (b"From: Ann <ann@acme.example>\\r\\nTo: bob@outside.example\\r\\n"
               b"Date: Mon, 3 Jun 2024 10:00:00 +0000\\r\\nMessage-ID: <1@acme.example>\\r\\n"
               b"Subject: hello\\r\\n\\r\\nhi\\r\\n")

    async def main():
        out = {}
        m = MilterFrontEnd("192.0.2.7", "mail.acme.example")  # a customer, by network
        await m.envfrom("<ann@acme.example>")
        await m.envrcpt("<bob@outside.example>")
        await m.eom(MESSAGE)
        out["customer"] = m.replies + [m.ctx.identity.name, m.ctx.finished]
        out["counted"] = sorted(k for k, c in SERVICES.limiter.counters.items() if c.value)

        m = MilterFrontEnd("198.51.100.9", "stranger.example")  # not a customer
        await m.envfrom("<x@stranger.example>")
        await m.envrcpt("<bob@outside.example>")
        await m.envrcpt("<postmaster@hosted.example>")
        out["stranger"] = m.replies

        m = MilterFrontEnd("192.0.2.7", "mail.acme.example")
        await m.envfrom("<ann@acme.example>")
        await m.envrcpt("<bob@outside.example>")
        await m.eom(MESSAGE.replace(b"Date: Mon, 3 Jun 2024 10:00:00 +0000\\r\\n", b""))
        out["no-date"] = m.replies[-1]
        out["modules"] = sorted(k for k in sys.modules if k == "aiosmtpd"
                                or k.startswith(("aiosmtpd.", "maild.smtp.")))
        print(json.dumps(out))

    asyncio.run(main())
''')


def test_a_whole_transaction_through_a_second_front_end_without_aiosmtpd():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["customer"] == ["250 2.0.0 Ok", "continue", "acme", True]
    assert any(k.startswith("cust:acme") for k in out["counted"]), out["counted"]
    assert out["stranger"][0].startswith("554 5.7.1 <bob@outside.example>: Relay access denied")
    assert out["stranger"][1] == "250 2.0.0 Ok"  # postmaster: accepted whatever else says
    assert out["no-date"].startswith("550 5.6.0 ") and "(date-missing)" in out["no-date"]
    # Only the downstream submission client (maild.optin sends its notices with it) is
    # loaded from maild.smtp; nothing of the SMTP server.
    assert set(out["modules"]) <= {"maild.smtp.downstream", "maild.smtp.submit"}
