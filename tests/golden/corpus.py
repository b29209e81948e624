"""The golden corpus: SMTP sessions and check-message runs, generated from one seed.

Each case is plain data (JSON-able): ``{"kind": "smtp", "group", "name", "source",
"steps"}`` where a step is ``["cmd", line]`` (one reply read), ``["data", message]`` (the
message after a 354, terminator included, one reply read) or ``["raw", text]`` (bytes sent
as they are, then one reply read); or ``{"kind": "check", "case": <a cases.toml entry>,
"json": bool}``. Strings carry bytes as latin-1 so NUL, bare LF and 8-bit data survive.
``advance`` (seconds) moves the fixed clock before the case runs.
"""

from __future__ import annotations

import random
import tomllib
import zlib
from pathlib import Path

SEED = 14
CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "headers"

STRANGER, STRANGER2, TRUSTED = "127.0.0.5", "127.0.0.6", "127.0.0.1"
ACME, RL, BULK, BAD, MANY, LISTCO = (
    "127.0.0.9",
    "127.0.0.20",
    "127.0.0.21",
    "127.0.0.22",
    "127.0.0.24",
    "127.0.0.30",
)
LISTS = "lists.hosted.example"
WORDS = [
    "alice",
    "bob",
    "carol",
    "dave",
    "eve",
    "info",
    "sales",
    "team",
    "x",
    "o'neil",
    "first.last",
    "a+tag",
    "UPPER",
    "z9",
]
OUTSIDE = [
    "outside.example",
    "elsewhere.example",
    "bank.example",
    "nowhere.example",
    "partner.example",
    "bank.com",
]


def message(
    frm: str,
    to: str,
    subject: str,
    *,
    extra: str = "",
    body: str = "Hello.\r\n",
    date: str = "Mon, 02 Mar 2026 10:00:00 +0000",
    msgid: str = "",
) -> str:
    """A well-formed message (CRLF, dot-terminated); ``extra`` is more header lines."""
    host = frm.rsplit("@", 1)[-1] or "hosted.example"
    msgid = msgid or f"<{zlib.crc32(f'{frm} {to} {subject}'.encode())}@{host}>"
    head = (
        f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {date}\r\n"
        f"Message-ID: {msgid}\r\n{extra}"
    )
    return head + "\r\n" + body + ".\r\n"


def session(
    group: str,
    name: str,
    source: str,
    steps: list[list[str]],
    *,
    helo: str | None = "client.example",
    advance: float = 1,
    quit: bool = True,
) -> dict:
    s = ([["cmd", f"EHLO {helo}"]] if helo is not None else []) + steps
    s += [["cmd", "QUIT"]] if quit else []
    return {
        "kind": "smtp",
        "group": group,
        "name": name,
        "source": source,
        "steps": s,
        "advance": advance,
    }


def mail(
    group: str,
    name: str,
    source: str,
    sender: str,
    rcpts: list[str],
    msg: str | None = None,
    *,
    helo: str = "client.example",
    advance: float = 1,
    params: str = "",
) -> dict:
    steps = [["cmd", f"MAIL FROM:<{sender}>{params}"]]
    steps += [["cmd", f"RCPT TO:<{r}>"] for r in rcpts]
    steps += [["cmd", "DATA"], ["data", msg or message(sender, rcpts[0] if rcpts else "", name)]]
    return session(group, name, source, steps, helo=helo, advance=advance)


def relay(rng: random.Random) -> list[dict]:
    out = []
    for i in range(30):
        lp, dom = rng.choice(WORDS), rng.choice(OUTSIDE)
        form = rng.choice(["plain", "percent", "route", "bang", "quoted", "mixed", "ip"])
        rcpt = {
            "plain": f"{lp}@{dom}",
            "percent": f"{lp}%{dom}@hosted.example",
            "route": f"@hosted.example:{lp}@{dom}",
            "bang": f"{dom}!{lp}@hosted.example",
            "quoted": f'"{lp}@{dom}"@hosted.example',
            "mixed": f"{lp}@{dom.upper()}",
            "ip": f"{lp}@[192.0.2.{rng.randint(1, 254)}]",
        }[form]
        src = rng.choice([STRANGER, STRANGER2])
        sender = rng.choice(
            ["", f"{rng.choice(WORDS)}@{rng.choice(OUTSIDE)}", "spoof@acme.example"]
        )
        out.append(mail("relay", f"{i}-{form}", src, sender, [rcpt]))
    # inbound to a hosted domain is not relaying; a customer may relay anywhere
    for i in range(6):
        out.append(
            mail(
                "relay",
                f"inbound-{i}",
                STRANGER,
                f"{rng.choice(WORDS)}@outside.example",
                [f"{rng.choice(WORDS)}@hosted.example"],
            )
        )
        out.append(
            mail(
                "relay",
                f"customer-{i}",
                ACME,
                f"{rng.choice(WORDS)}@acme.example",
                [f"{rng.choice(WORDS)}@{rng.choice(OUTSIDE)}"],
            )
        )
    out.append(
        mail(
            "relay",
            "downstream-refuses",
            ACME,
            "boss@acme.example",
            ["nouser@outside.example", "ok@outside.example"],
        )
    )
    return out


def postmaster(rng: random.Random) -> list[dict]:
    out = []
    targets = [
        "postmaster@hosted.example",
        "abuse@hosted.example",
        "POSTMASTER@Hosted.Example",
        "postmaster@host.hosted.example",
        "postmaster",
        "Postmaster",
    ]
    for i, t in enumerate(targets):
        out.append(mail("postmaster", f"{i}-alone", STRANGER, "blocked@outside.example", [t]))
        extra = f"{rng.choice(WORDS)}@{rng.choice(OUTSIDE)}"
        out.append(mail("postmaster", f"{i}-with-relay", STRANGER, "x@outside.example", [t, extra]))
    out.append(mail("postmaster", "null-sender", STRANGER, "", ["postmaster@hosted.example"]))
    return out


def recipients(rng: random.Random) -> list[dict]:
    out = []
    for n in range(1, 9):
        rcpts = [f"r{n}-{k}@{rng.choice(OUTSIDE)}" for k in range(n)]
        out.append(mail("recipients", f"{n}", MANY, "lists@many.example", rcpts))
    return out


def ratelimit(rng: random.Random) -> list[dict]:
    out = []
    for i in range(8):  # messages 4/1h: the fifth is refused
        out.append(
            mail(
                "ratelimit",
                f"messages-{i}",
                RL,
                "out@rl.example",
                [f"{rng.choice(WORDS)}{i}@outside.example"],
            )
        )
    out.append(
        mail(
            "ratelimit",
            "after-the-hour",
            RL,
            "out@rl.example",
            ["later@outside.example"],
            advance=3700,
        )
    )
    for i in range(5):  # same recipient 3/1h, under another customer budget
        out.append(
            mail(
                "ratelimit",
                f"same-recipient-{i}",
                ACME,
                "boss@acme.example",
                ["target@elsewhere.example"],
            )
        )
    return out


def bulk(rng: random.Random) -> list[dict]:
    out = []
    body = "Big SALE this week only! Everything half price at shop.example.\r\n" * 3
    for i in range(9):  # threshold 5: the campaign crosses it
        to = f"{rng.choice(WORDS)}{i}@{rng.choice(OUTSIDE)}"
        out.append(
            mail(
                "bulk",
                f"campaign-{i}",
                BULK,
                "news@bulk.example",
                [to],
                message("news@bulk.example", to, "Big sale", body=body),
            )
        )
    return out


def sanctions(rng: random.Random) -> list[dict]:
    out = []
    forged = message("ceo@bank.example", "victim@outside.example", "Invoice")
    out.append(
        mail(
            "sanctions",
            "forged-1-warn",
            BAD,
            "crook@bad.example",
            ["victim@outside.example"],
            forged,
        )
    )
    out.append(
        mail("sanctions", "clean-after-warn", BAD, "crook@bad.example", ["friend@outside.example"])
    )
    out.append(
        mail(
            "sanctions",
            "forged-2-block",
            BAD,
            "crook@bad.example",
            ["victim2@outside.example"],
            forged,
            advance=7200,
        )
    )
    for i in range(3):
        out.append(
            mail(
                "sanctions",
                f"blocked-{i}",
                BAD,
                "crook@bad.example",
                [f"{rng.choice(WORDS)}@outside.example"],
            )
        )
    return out


def optin(rng: random.Random) -> list[dict]:
    out = []
    for i, who in enumerate(("subscriber", "pending", "stranger", "subscriber")):
        rcpt = f"{who}@hosted.example"
        lid = "news.acme.example"
        msg = message(
            "news@listco.example",
            rcpt,
            "This month",
            extra=f"List-Id: <{lid}>\r\nList-Unsubscribe: <mailto:news-leave@{LISTS}>\r\n",
        )
        out.append(mail("optin", f"{i}-{who}", LISTCO, f"news-bounces+x@{LISTS}", [rcpt], msg))
    msg = message(
        "news@listco.example",
        "subscriber@hosted.example",
        "Mixed",
        extra="List-Id: <news.acme.example>\r\n",
    )
    out.append(
        mail(
            "optin",
            "mixed",
            LISTCO,
            f"news-bounces+x@{LISTS}",
            ["subscriber@hosted.example", "pending@hosted.example", "stranger@hosted.example"],
            msg,
        )
    )
    out.append(
        mail(
            "optin",
            "bogus-confirm",
            STRANGER,
            "pending@hosted.example",
            [f"confirm+{'a' * 32}@{LISTS}"],
        )
    )
    out.append(
        mail(
            "optin",
            "unregistered-list",
            LISTCO,
            "rogue@listco.example",
            ["subscriber@hosted.example"],
            message(
                "rogue@listco.example",
                "subscriber@hosted.example",
                "Hi",
                extra="List-Id: <rogue.listco.example>\r\n",
            ),
        )
    )
    return out


def protocol(rng: random.Random) -> list[dict]:
    out: list[dict] = []
    g = "protocol"
    plain = [["cmd", "MAIL FROM:<boss@acme.example>"], ["cmd", "RCPT TO:<x@outside.example>"]]
    syntax = [
        "MAIL FROM:boss@acme.example",
        "MAIL FROM:<boss@acme.example",
        "MAIL TO:<a@b>",
        "RCPT TO:<x@outside.example>",
        "MAIL FROM:<a@b> BODY=9BIT",
        "MAIL FROM:<a@b> FOO=1",
        "MAIL FROM:<a@b> SIZE=abc",
        "MAIL FROM:<<a@b>>",
        "MAIL FROM:<a@@b>",
        "HELO",
        "EHLO",
        "VRFY postmaster",
        "EXPN staff",
        "NOOP",
        "RSET",
        "WIBBLE",
        "DATA",
        "MAIL FROM:<a b@c.example>",
        "MAIL FROM: <spaced@acme.example>",
        "mail from:<lower@acme.example>",
        "TURN",
        "ETRN hosted.example",
    ]
    for i, line in enumerate(syntax):
        out.append(session(g, f"syntax-{i}", rng.choice([ACME, STRANGER]), [["cmd", line]]))
    for i in range(6):
        junk = "".join(rng.choice('ABCdef<>@:; \t.%!"') for _ in range(rng.randint(1, 30)))
        out.append(session(g, f"junk-{i}", STRANGER, [["cmd", f"MAIL FROM:{junk}"]]))
    utf = "jos\u00e9@acme.example"
    out.append(session(g, "utf8-no-smtputf8", ACME, [["cmd", f"MAIL FROM:<{utf}>"]]))
    out.append(mail(g, "utf8-smtputf8", ACME, utf, ["z@outside.example"], params=" SMTPUTF8"))
    out.append(
        session(
            g,
            "utf8-rcpt-no-smtputf8",
            ACME,
            [
                ["cmd", "MAIL FROM:<boss@acme.example>"],
                ["cmd", "RCPT TO:<m\u00fcller@outside.example>"],
            ],
        )
    )
    out.append(
        session(g, "invalid-utf8", ACME, [["raw", "MAIL FROM:<b\xe9@acme.example> SMTPUTF8\r\n"]])
    )
    for n in (998, 999, 1000, 1200, 5000):
        line = "X-Long: " + "a" * (n - 8)
        msg = (
            "From: boss@acme.example\r\nTo: x@outside.example\r\nSubject: long\r\n"
            f"Date: Mon, 02 Mar 2026 10:00:00 +0000\r\nMessage-ID: <long{n}@acme.example>\r\n"
            f"\r\n{line}\r\n.\r\n"
        )
        out.append(session(g, f"line-{n}", ACME, [*plain, ["cmd", "DATA"], ["data", msg]]))
    out.append(session(g, "command-line-too-long", ACME, [["cmd", "NOOP " + "x" * 600]]))
    out.append(
        session(g, "size-declared", ACME, [["cmd", "MAIL FROM:<boss@acme.example> SIZE=999999"]])
    )
    big = message("boss@acme.example", "x@outside.example", "big", body=("y" * 70 + "\r\n") * 100)
    out.append(session(g, "size-data", ACME, [*plain, ["cmd", "DATA"], ["data", big]]))
    bare = message("boss@acme.example", "x@outside.example", "bare LF", body="one\ntwo\r\n")
    out.append(session(g, "bare-lf", ACME, [*plain, ["cmd", "DATA"], ["data", bare]]))
    cr = message("boss@acme.example", "x@outside.example", "bare CR", body="one\rtwo\r\n")
    out.append(session(g, "bare-cr", ACME, [*plain, ["cmd", "DATA"], ["data", cr]]))
    nul = message("boss@acme.example", "x@outside.example", "nul", body="one\x00two\r\n")
    out.append(session(g, "nul", ACME, [*plain, ["cmd", "DATA"], ["data", nul]]))
    out.append(
        session(
            g,
            "smuggle-lf-dot",
            ACME,
            [
                *plain,
                ["cmd", "DATA"],
                [
                    "data",
                    message(
                        "boss@acme.example",
                        "x@outside.example",
                        "smuggle",
                        body="a\r\n\n.\nMAIL FROM:<e@v.example>\r\n",
                    ),
                ],
            ],
        )
    )
    out.append(session(g, "bare-lf-command", ACME, [["raw", "NOOP\n"]]))
    xf = "XFORWARD ADDR=198.51.100.7 NAME=spoof.example"
    out.append(session(g, "xforward-untrusted", STRANGER, [["cmd", xf], *plain]))
    out.append(mail(g, "xforward-trusted", TRUSTED, "fwd@outside.example", ["a@hosted.example"]))
    out.append(
        session(
            g,
            "xforward-trusted-then-mail",
            TRUSTED,
            [
                ["cmd", "XFORWARD ADDR=127.0.0.9 NAME=mail.acme.example HELO=mail.acme.example"],
                ["cmd", "MAIL FROM:<boss@acme.example>"],
                ["cmd", "RCPT TO:<x@outside.example>"],
            ],
        )
    )
    for i, h in enumerate(
        [
            "HELP",
            "HELP MAIL",
            "HELP nonsense",
            "AUTH PLAIN AGFsaWNlAHNlY3JldA==",
            "AUTH LOGIN",
            "STARTTLS",
            "BDAT 10 LAST",
        ]
    ):
        out.append(session(g, f"verb-{i}", ACME, [["cmd", h]]))
    out.append(
        session(g, "bdat-after-mail", ACME, [*plain, ["cmd", "BDAT 5 LAST"], ["cmd", "NOOP"]])
    )
    out.append(
        session(
            g, "helo-only", STRANGER, [["cmd", "MAIL FROM:<a@outside.example>"]], helo="[127.0.0.5]"
        )
    )
    out.append(
        session(
            g,
            "no-helo",
            STRANGER,
            [["cmd", "MAIL FROM:<a@outside.example>"], ["cmd", "RCPT TO:<b@hosted.example>"]],
            helo=None,
        )
    )
    out.append(
        session(
            g,
            "helo-not-ehlo",
            STRANGER,
            [["cmd", "HELO client.example"], ["cmd", "MAIL FROM:<a@outside.example> SMTPUTF8"]],
            helo=None,
        )
    )
    out.append(session(g, "rcpt-before-mail", ACME, [["cmd", "RCPT TO:<a@outside.example>"]]))
    out.append(
        session(
            g,
            "double-mail",
            ACME,
            [["cmd", "MAIL FROM:<a@acme.example>"], ["cmd", "MAIL FROM:<b@acme.example>"]],
        )
    )
    out.append(
        session(g, "data-no-rcpt", ACME, [["cmd", "MAIL FROM:<a@acme.example>"], ["cmd", "DATA"]])
    )
    out.append(session(g, "rset-mid", ACME, [*plain, ["cmd", "RSET"], ["cmd", "DATA"]]))
    out.append(
        session(
            g,
            "pipelined",
            ACME,
            [
                ["raw", "MAIL FROM:<boss@acme.example>\r\nRCPT TO:<p@outside.example>\r\nNOOP\r\n"],
                ["read", ""],
                ["read", ""],
            ],
        )
    )
    return out


def header_checks() -> list[dict]:
    cases = tomllib.loads((CORPUS / "cases.toml").read_text())["case"]
    out = []
    for i, c in enumerate(cases):
        for as_json in (False, True):
            out.append(
                {
                    "kind": "check",
                    "group": "headers",
                    "name": f"{i}-{c['file']}" + ("-json" if as_json else ""),
                    "case": c,
                    "json": as_json,
                    "advance": 0,
                }
            )
    return out


def cases() -> list[dict]:
    """Every case, in the order they run (later groups see earlier groups' counters)."""
    rng = random.Random(SEED)
    out = header_checks()
    for make in (relay, postmaster, recipients, ratelimit, bulk, sanctions, optin, protocol):
        out += make(rng)
    return out
