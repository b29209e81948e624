"""SMTP probes for `maild postmaster check` and `maild doctor`: talk, never send.

A probe opens a session, says EHLO, MAIL FROM:<>, RCPT TO for each address, then RSET
and QUIT: nothing is ever queued. Blocking smtplib is fine here (CLI, not the daemon).
"""

from __future__ import annotations

import smtplib
from dataclasses import dataclass, field


@dataclass
class ProbeResult:
    target: str
    connected: bool = False
    banner: str = ""
    ehlo: dict[str, str] = field(default_factory=dict)
    rcpt: dict[str, tuple[int, str]] = field(default_factory=dict)
    error: str = ""

    def accepted(self, address: str) -> bool:
        code = self.rcpt.get(address, (0, ""))[0]
        return 200 <= code < 300


def probe(
    host: str,
    port: int,
    rcpts: list[str],
    *,
    helo: str,
    timeout: float = 15.0,
    source: str | None = None,
) -> ProbeResult:
    res = ProbeResult(f"{host}:{port}")
    try:
        s = smtplib.SMTP(
            timeout=timeout, local_hostname=helo, source_address=(source, 0) if source else None
        )
        code, msg = s.connect(host, port)
        res.connected, res.banner = True, f"{code} {msg.decode(errors='replace')}"
        code, _ = s.ehlo(helo)
        if code == 250:
            res.ehlo = dict(s.esmtp_features)
        if rcpts:
            code, msg = s.docmd("MAIL", "FROM:<>")
            if code != 250:
                res.error = f"MAIL FROM:<> answered {code} {msg.decode(errors='replace')}"
            else:
                for a in rcpts:
                    c, m = s.docmd("RCPT", f"TO:<{a}>")
                    res.rcpt[a] = (c, m.decode(errors="replace"))
            s.docmd("RSET")
        s.quit()
    except (TimeoutError, OSError, smtplib.SMTPException) as e:
        res.error = res.error or f"{type(e).__name__}: {e}"
    return res
