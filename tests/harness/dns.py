"""A real, small authoritative DNS server on loopback (UDP and TCP), for tests only.

Built on dnspython's message and zone API, so the resolver under test speaks real DNS
over real sockets and never reaches the live internet. It serves one zone rooted at "."
(so any name can be defined, TLDs included), answers NXDOMAIN for names that do not
exist and NODATA for existing names without the asked type, both with the SOA in the
authority section (negative TTL, RFC 2308). Names in ``servfail`` get SERVFAIL and names
in ``drop`` get no answer at all (a resolver timeout). ``queries`` records what was asked.
"""

from __future__ import annotations

import atexit
import contextlib
import socket
import struct
import threading
from collections.abc import Iterable

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone

SOA = "@ 3600 IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60\n@ 3600 IN NS ns.test.\n"

# The names the integration tests send from and to. TTLs are long: tests never wait.
STANDARD_ZONE = """
acme.example.     3600 IN MX 10 mx.acme.example.
mx.acme.example.  3600 IN A 127.0.0.9
mail.acme.example. 3600 IN A 127.0.0.9
hosted.example.   3600 IN MX 10 host.hosted.example.
host.hosted.example. 3600 IN A 127.0.0.1
mx.hosted.example. 3600 IN A 127.0.0.1
outside.example.  3600 IN MX 10 mx.outside.example.
mx.outside.example. 3600 IN A 192.0.2.25
elsewhere.example. 3600 IN MX 10 mx.elsewhere.example.
mx.elsewhere.example. 3600 IN A 192.0.2.26
newcust.example.  3600 IN A 192.0.2.27
partner.example.  3600 IN A 192.0.2.10
trusted-partner.example. 3600 IN MX 10 mx.trusted-partner.example.
fwd.example.      3600 IN MX 10 mx.fwd.example.
bank.example.     3600 IN MX 10 mx.bank.example.
mx.bank.example.  3600 IN A 192.0.2.11
v6only.acme.example. 3600 IN AAAA 2001:db8::9
nullmx.acme.example. 3600 IN MX 0 .
nodata.acme.example. 3600 IN TXT "no mail here"
client.example.   3600 IN A 127.0.0.5
com.              3600 IN NS ns.test.
bank.com.         3600 IN A 192.0.2.12
paypal.com.       3600 IN A 192.0.2.13
"""
# Under acme.example (so the customer owns them) but broken on purpose.
STANDARD_SERVFAIL = ("servfail.acme.example.",)
STANDARD_DROP = ("timeout.acme.example.",)


class DnsServer:
    """``DnsServer(zone_text).start()``; ``.nameserver`` is "127.0.0.1:PORT"."""

    def __init__(
        self,
        records: str = STANDARD_ZONE,
        *,
        servfail: Iterable[str] = (),
        drop: Iterable[str] = (),
        host: str = "127.0.0.1",
    ) -> None:
        self.zone = dns.zone.from_text(SOA + records, origin=dns.name.root, relativize=False)
        self.soa = self.zone.find_rrset(dns.name.root, dns.rdatatype.SOA)
        self.servfail = {dns.name.from_text(n) for n in servfail}
        self.drop = {dns.name.from_text(n) for n in drop}
        self.host = host
        self.port = 0
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    def count(self, name: str, rdtype: str | None = None) -> int:
        """How many queries asked for ``name`` (and ``rdtype``, when given)."""
        n = dns.name.from_text(name).to_text()
        with self._lock:
            return sum(1 for q, t in self.queries if q == n and (rdtype is None or t == rdtype))

    def reset_counts(self) -> None:
        with self._lock:
            self.queries.clear()

    # ------------------------------------------------------------------ answering

    def _exists(self, name: dns.name.Name) -> bool:
        """A name exists when it owns records or has descendants (empty non-terminal)."""
        return any(n == name or n.is_subdomain(name) for n in self.zone.nodes)

    def answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if not query.question:
            return None
        q = query.question[0]
        with self._lock:
            self.queries.append((q.name.to_text(), dns.rdatatype.to_text(q.rdtype)))
        if q.name in self.drop:
            return None
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        if q.name in self.servfail:
            resp.set_rcode(dns.rcode.SERVFAIL)
            return resp.to_wire()
        node = self.zone.get_node(q.name)
        rdataset = node.get_rdataset(dns.rdataclass.IN, q.rdtype) if node is not None else None
        if rdataset is not None:
            rrset = dns.rrset.RRset(q.name, dns.rdataclass.IN, q.rdtype)
            rrset.update(rdataset)
            resp.answer.append(rrset)
        else:
            if not self._exists(q.name):
                resp.set_rcode(dns.rcode.NXDOMAIN)
            resp.authority.append(self.soa)
        return resp.to_wire()

    # ------------------------------------------------------------------ sockets

    def start(self) -> DnsServer:
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            self._udp, self._tcp, self.port = udp, tcp, port
            break
        else:
            raise RuntimeError("no free port for the test DNS server")
        for target in (self._serve_udp, self._serve_tcp):
            t = threading.Thread(target=target, daemon=True, name=f"dns-{target.__name__}")
            t.start()
            self._threads.append(t)
        return self

    def _serve_udp(self) -> None:
        assert self._udp is not None
        self._udp.settimeout(0.2)
        while not self._stop.is_set():
            try:
                wire, peer = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            out = self.answer(wire)
            if out is not None:
                with contextlib.suppress(OSError):
                    self._udp.sendto(out, peer)

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        self._tcp.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    size = struct.unpack("!H", _recv_exact(conn, 2))[0]
                    out = self.answer(_recv_exact(conn, size))
                    if out is not None:
                        conn.sendall(struct.pack("!H", len(out)) + out)
                except (OSError, struct.error):
                    continue

    def stop(self) -> None:
        self._stop.set()
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()
        for t in self._threads:
            t.join(timeout=2)
        self._threads.clear()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise OSError("short read")
        buf += chunk
    return buf


_shared: DnsServer | None = None
_shared_lock = threading.Lock()


def shared_server() -> DnsServer:
    """The one standard-zone server of this test process, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = DnsServer(
                STANDARD_ZONE, servfail=STANDARD_SERVFAIL, drop=STANDARD_DROP
            ).start()
            atexit.register(_shared.stop)
        return _shared
