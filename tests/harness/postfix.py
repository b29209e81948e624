"""A private, throw-away Postfix instance for integration tests.

Layout under ``Postfix.root`` (everything the instance owns lives there)::

    etc/main.cf, etc/master.cf        configuration written by __init__
    etc/deliver.sh, etc/users         the hosted-domain delivery script (see below)
    queue/                            queue_directory (pid/master.pid inside)
    data/                             data_directory (owned by postfix)
    mail/<domain>/<local>/{new,cur,tmp}  one Maildir per hosted recipient (lower case)
    mail/@outside/{new,cur,tmp}       catch-all for every non-hosted recipient
    postfix.log                       maillog_file (there is no syslog in CI)

``root`` is the directory you pass unless unprivileged daemons could not reach
it (pytest's tmp dirs are 0700) or it is too long for the postlog unix socket:
then the instance lives in /tmp/maild-pf-XXXX and your path is a symlink to it
(``close()`` removes it; so does interpreter exit).

Services in master.cf (the unix services are copied from Debian's master.cf with
chroot turned off and pipe(8) transports dropped; no template inet service survives):

* ``127.0.0.1:smtpd_port``    public smtpd (Postfix defaults: mynetworks
  127.0.0.0/8, relay to non-hosted domains only from mynetworks or SASL).  With
  ``proxy_filter`` it is the before-queue layout: smtpd -> filter (maild) ->
  re-injection smtpd.  ``sasl_users`` adds Dovecot SASL AUTH here.
* ``127.0.0.1:reinject_port`` re-injection smtpd (XFORWARD from 127.0.0.0/8,
  permit_mynetworks only, no unknown-recipient checks): where maild delivers.
* ``hosted`` (pipe)           delivery for the hosted domains (virtual_transport):
  a tiny sh script writes ``mail/<domain>/<local>/new/...`` as nobody, with
  Return-Path, Delivered-To and X-Original-To like virtual(8).  virtual(8)
  itself cannot do this without a user list: it forbids ``$1`` substitution
  in virtual_mailbox_maps.  ``users=`` restricts the existing addresses.
* ``outside`` (virtual)       every non-hosted domain (default_transport and
  relay_transport) goes to ONE Maildir that tests can count
  (``outside_messages``), never to the internet.  ``outside_sink=`` replaces
  it with an SMTP next hop (e.g. an ``SmtpSink`` port) or any transport string.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tests.harness.waits import patience

from .ports import free_port, listened_by, port_open

MASTER_CF_TEMPLATES = (Path("/etc/postfix/master.cf"), Path("/usr/share/postfix/master.cf.dist"))
OUTSIDE_DIR = "@outside"
VMAIL_UID = 65534
VMAIL_GID = 65534
LOOPBACK = "127.0.0.1"

# Used only when neither Debian template exists (postfix removed, config purged).
_FALLBACK_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# pipe(8) delivery for hosted domains: one Maildir per recipient, any local part.
# Runs as nobody; exit 67 (EX_NOUSER) bounces, 75 (EX_TEMPFAIL) defers.
_DELIVER_SH = r"""# usage: deliver.sh MAILBASE USERS|- RECIPIENT  (message on stdin)
set -u
base=$1 users=$2 rcpt=$3
case $rcpt in
  *@*) ;;
  *) echo "5.1.3 no domain in <$rcpt>"; exit 67 ;;
esac
lp=${rcpt%@*}
dom=${rcpt##*@}
case $lp in ""|.*|*/*) echo "5.1.1 unusable local part in <$rcpt>"; exit 67 ;; esac
case $dom in ""|.*|*/*) echo "5.1.2 unusable domain in <$rcpt>"; exit 67 ;; esac
if [ "$users" != - ] && ! grep -qixF -e "$rcpt" "$users"; then
  echo "5.1.1 unknown user: $rcpt"; exit 67
fi
md=$base/$dom/$lp
mkdir -p "$md/tmp" "$md/new" "$md/cur" || exit 75
f=$(mktemp "$md/tmp/$(date +%s).XXXXXXXXXX") || exit 75
cat > "$f" || { rm -f "$f"; exit 75; }
mv "$f" "$md/new/" || exit 75
"""

REINJECT_DEFAULTS: dict[str, str] = {
    "syslog_name": "postfix/reinject",
    "smtpd_authorized_xforward_hosts": "127.0.0.0/8",
    "smtpd_client_restrictions": "",
    "smtpd_helo_restrictions": "",
    "smtpd_sender_restrictions": "",
    "smtpd_recipient_restrictions": "permit_mynetworks,reject",
    "smtpd_relay_restrictions": "",
    "mynetworks": "127.0.0.0/8",
    "receive_override_options": "no_unknown_recipient_checks",
}

_running: weakref.WeakSet[Postfix] = weakref.WeakSet()


class PostfixError(RuntimeError):
    """Postfix could not be configured, started or queried."""


def find_binary(name: str) -> str | None:
    """Locate a Postfix/test tool; /usr/sbin is often missing from a non-login PATH."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin", "/usr/local/bin"):
        p = Path(d, name)
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def _need_binary(name: str) -> str:
    path = find_binary(name)
    if path is None:
        raise PostfixError(f"{name} not installed")
    return path


def _clean_env() -> dict[str, str]:
    """Environment for Postfix commands: no inherited MAIL_CONFIG and friends."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin:" + env.get("PATH", "")
    env.setdefault("LANG", "C")
    return env


def _o(name: str, value: str) -> str:
    """One master.cf ``-o`` option; values with whitespace need the ``{ }`` form."""
    if re.search(r"\s", value):
        return f"-o {{ {name} = {value} }}"
    return f"-o {name}={value}"


_created_runtime_dirs: list[Path] = []


def _reachable_by_daemons(path: Path) -> bool:
    """Can an unprivileged user (postfix, nobody) walk down to ``path``?"""
    for p in [path, *path.parents]:
        try:
            if not p.stat().st_mode & 0o001:
                return False
        except FileNotFoundError:
            continue
    return True


def _tmp_base() -> str:
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d) and _reachable_by_daemons(Path(d)):
            return d
    raise PostfixError("no world-searchable temp directory (/tmp, /var/tmp, /dev/shm)")


def runtime_dir(path: Path | str, prefix: str, *, max_len: int = 1000) -> tuple[Path, bool]:
    """A real directory for ``path`` that unprivileged daemons can reach.

    pytest's tmp dirs are 0700 and another pytest session resets
    /tmp/pytest-of-root to 0700 at will, so the postfix user and uid 65534
    could not reach a queue or Maildir there.  Unix socket paths also have a
    108-byte limit.  If ``path`` is unusable the directory is created as
    /tmp/<prefix>XXXX (0755) and ``path`` becomes a symlink to it (or, if
    ``path`` is a non-empty directory, ``path/<prefix>link``).
    Returns (real directory, created-in-tmp); ``cleanup_runtime_dir`` removes the latter.
    """
    path = Path(path).absolute()
    if path.is_symlink() and path.resolve().is_dir():
        real = path.resolve()
        return real, real in _created_runtime_dirs
    if _reachable_by_daemons(path.parent) and len(str(path)) <= max_len:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o755)
        return path, False
    real = Path(tempfile.mkdtemp(prefix=prefix, dir=_tmp_base()))
    os.chmod(real, 0o755)
    _created_runtime_dirs.append(real)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and any(path.iterdir()):
        link = path / f"{prefix}link"
        link.unlink(missing_ok=True)
        link.symlink_to(real)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()
        path.symlink_to(real)
    return real, True


def cleanup_runtime_dir(real: Path) -> None:
    """Remove a directory made by ``runtime_dir`` in /tmp (no-op for others)."""
    if real in _created_runtime_dirs:
        shutil.rmtree(real, ignore_errors=True)
        _created_runtime_dirs.remove(real)


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _maildir_files(maildir: Path) -> list[Path]:
    files: list[Path] = []
    for sub in ("new", "cur"):
        d = maildir / sub
        if d.is_dir():
            files.extend(f for f in d.iterdir() if f.is_file())
    files.sort(key=lambda f: (f.stat().st_mtime_ns, f.name))
    return files


class DovecotAuth:
    """A private Dovecot whose only job is SASL auth for Postfix (passwd-file users).

    Listens on a loopback TCP port (``inet:127.0.0.1:port`` for smtpd_sasl_path),
    which avoids unix-socket path length limits of deep pytest tmp dirs.
    Runtime files live in a short mkdtemp dir under /tmp, removed by ``stop()``.
    """

    def __init__(self, root: Path, users: Mapping[str, str], *, port: int | None = None) -> None:
        self.root = Path(root)
        self.users = dict(users)
        self.port = port or free_port()
        self.log_path = self.root / "dovecot.log"
        self._rundir: Path | None = None
        self._conf: Path | None = None

    def start(self, timeout: float = 20.0) -> None:
        timeout = patience(timeout)
        dovecot = _need_binary("dovecot")
        self._rundir = Path(tempfile.mkdtemp(prefix="maild-dv-", dir=_tmp_base()))
        os.chmod(self._rundir, 0o755)
        passwd = self._rundir / "passwd"
        passwd.write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in self.users.items()))
        os.chmod(passwd, 0o644)
        self._conf = self._rundir / "dovecot.conf"
        self._conf.write_text(
            f"""\
base_dir = {self._rundir}/run
state_dir = {self._rundir}/state
instance_name = maild-test-{self.port}
protocols =
listen = {LOOPBACK}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
log_path = {self.log_path}
default_internal_user = dovecot
default_login_user = dovenull
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = uid={VMAIL_UID} gid={VMAIL_GID} home=/nonexistent
}}
service auth {{
  user = root
  inet_listener {{
    address = {LOOPBACK}
    port = {self.port}
  }}
}}
service anvil {{
  chroot =
  # no auth penalty: a wrong-password test must not slow the next login down
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""
        )
        # Output to a file: the daemon inherits stdio, so a pipe would never hit EOF.
        out_path = self._rundir / "startup.out"
        with open(out_path, "wb") as out_f:
            proc = subprocess.run(
                [dovecot, "-c", str(self._conf)],
                stdin=subprocess.DEVNULL,
                stdout=out_f,
                stderr=subprocess.STDOUT,
                timeout=30,
                env=_clean_env(),
            )
        if proc.returncode != 0:
            out = out_path.read_text(errors="replace")
            self.stop()
            raise PostfixError(f"dovecot failed to start:\n{out}\n{self._log_tail()}")
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if time.monotonic() > deadline:
                self.stop()
                raise PostfixError(
                    f"dovecot auth never listened on {self.port}\n{self._log_tail()}"
                )
            time.sleep(0.05)

    @property
    def client_socket(self) -> Path:
        """Dovecot's own auth-client Unix socket (the auth protocol, as on the TCP port)."""
        assert self._rundir is not None, "not started"
        return self._rundir / "run" / "auth-client"

    def _log_tail(self) -> str:
        try:
            return _tail(self.log_path.read_text(errors="replace"))
        except OSError:
            return "(no dovecot log)"

    def stop(self) -> None:
        master_pid = self._master_pid()
        if master_pid and self._conf is not None and _pid_alive(master_pid, str(self._conf)):
            with contextlib.suppress(OSError):
                os.kill(master_pid, signal.SIGTERM)  # what "doveadm stop" does
            _wait_pid_gone(master_pid, str(self._conf), 10.0, kill=True)
        if self._rundir is not None:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None
            self._conf = None

    def _master_pid(self) -> int | None:
        if self._rundir is None:
            return None
        try:
            return int((self._rundir / "run" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


def _run_tty_stderr(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a Postfix command with stderr on a pty.

    Postfix logs to stderr only when it is a terminal; otherwise errors found
    before maillog_file is set up (bad main.cf, unknown mail_owner...) would go
    to syslog, which a container does not have.
    """
    master_fd, slave_fd = os.openpty()
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=slave_fd,
            stderr=slave_fd,
            env=_clean_env(),
            start_new_session=True,
        )
    finally:
        os.close(slave_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master_fd], [], [], 0.05)
            if ready:
                try:
                    data = os.read(master_fd, 65536)
                except OSError:  # EIO: every writer closed the pty
                    data = b""
                if data:
                    chunks.append(data)
                    continue
                proc.wait(max(0.1, deadline - time.monotonic()))
                break
            if proc.poll() is not None:
                break  # exited, nothing pending (a daemon may still hold the pty)
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout, b"".join(chunks))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        raise
    finally:
        os.close(master_fd)
    out = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _pid_alive(pid: int, owner: str) -> bool:
    """Whether pid is a live process of the instance whose config path is owner.

    A master.pid file outlives a killed master, and this machine's pid space is
    small (pid_max 32768) and busy: the number may already belong to another
    test's process, which a bare kill would take down. So the process must name
    the config, on its command line (dovecot -c) or in MAIL_CONFIG (Postfix).
    """
    proc = Path(f"/proc/{pid}")
    try:
        # A zombie still "exists"; treat it as gone.
        if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        named = (proc / "cmdline").read_bytes() + b"\0" + (proc / "environ").read_bytes()
    except (OSError, IndexError):
        return False
    words = named.split(b"\0")
    return owner.encode() in words or f"MAIL_CONFIG={owner}".encode() in words


def _wait_pid_gone(pid: int, owner: str, timeout: float, *, kill: bool) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid, owner):
            return True
        time.sleep(0.05)
    if kill and _pid_alive(pid, owner):
        for target in (-pid, pid):  # process group first: takes the children too
            with contextlib.suppress(OSError):
                os.kill(target, signal.SIGKILL)
        end = time.monotonic() + 5
        while time.monotonic() < end and _pid_alive(pid, owner):
            time.sleep(0.05)
    return not _pid_alive(pid, owner)


class Postfix:
    """A private Postfix instance in ``root`` (see the module docstring for layout).

    The configuration is written by the constructor (inspect or tweak
    ``etc/`` before ``start()`` if needed); ``start()`` launches the master and
    waits until both smtpd ports accept connections.  Use as a context manager
    or call ``stop()``; instances still running at interpreter exit are stopped.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        hosted_domains: Iterable[str] = ("hosted.example", "host.hosted.example"),
        smtpd_port: int | None = None,
        reinject_port: int | None = None,
        proxy_filter: str | None = None,
        proxy_options: str = "",
        proxy_timeout: str | None = None,
        main_cf: Mapping[str, str] | None = None,
        smtpd_options: Mapping[str, str] | None = None,
        reinject_options: Mapping[str, str] | None = None,
        outside_sink: int | str | None = None,
        users: Iterable[str] | None = None,
        sasl_users: Mapping[str, str] | None = None,
        extra_master_cf: str = "",
        hostname: str = "mx.postfix.test",
    ) -> None:
        """Write the configuration.

        ``proxy_filter`` (e.g. ``"127.0.0.1:10025"``) turns the public smtpd into
        the before-queue layout; ``proxy_options``/``proxy_timeout`` set
        smtpd_proxy_options/smtpd_proxy_timeout on it.  ``main_cf`` overrides
        main.cf; ``smtpd_options``/``reinject_options`` add or override ``-o``
        options of the public/re-injection smtpd.  ``outside_sink``: ``None`` =
        catch-all Maildir, an ``int`` = SMTP port on 127.0.0.1 to relay
        non-hosted mail to, a ``str`` = any Postfix transport (``"discard:"``).
        ``users``: only these hosted addresses exist (default: any local part).
        ``sasl_users``: {login: password}; starts a private Dovecot for SASL
        auth and enables AUTH on the public smtpd (not on re-injection).
        """
        self.requested_root = Path(root).absolute()
        # public/postlog (absolute socket path) must fit in sun_path: keep root short.
        self.root, self._own_root = runtime_dir(self.requested_root, "maild-pf-", max_len=80)
        if re.search(r"\s", str(self.root)):
            raise ValueError(f"Postfix root may not contain whitespace: {self.root}")
        self.hosted_domains = tuple(d.lower() for d in hosted_domains)
        self._auto_smtpd = smtpd_port is None
        self._auto_reinject = reinject_port is None
        self.smtpd_port = smtpd_port or free_port()
        self.reinject_port = reinject_port or free_port()
        self.proxy_filter = proxy_filter
        self.outside_sink = outside_sink
        self.hostname = hostname
        self.users = None if users is None else tuple(u.lower() for u in users)
        self.etc = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.mail_dir = self.root / "mail"
        self.log_path = self.root / "postfix.log"
        self.dovecot: DovecotAuth | None = (
            DovecotAuth(self.root, sasl_users) if sasl_users is not None else None
        )
        self._started = False

        public = dict(smtpd_options or {})
        if proxy_filter:
            public = {"smtpd_proxy_filter": proxy_filter, **public}
            if proxy_options:
                public = {"smtpd_proxy_options": proxy_options, **public}
            if proxy_timeout:
                public = {"smtpd_proxy_timeout": proxy_timeout, **public}
        if self.dovecot is not None:
            public = {
                "smtpd_sasl_auth_enable": "yes",
                "smtpd_sasl_type": "dovecot",
                "smtpd_sasl_path": f"inet:{LOOPBACK}:{self.dovecot.port}",
                **public,
            }
        self.smtpd_options = public
        self.reinject_options = {**REINJECT_DEFAULTS, **(reinject_options or {})}
        self.extra_master_cf = extra_master_cf
        self.main_cf = {**self._default_main_cf(), **(main_cf or {})}
        self.write_config()

    # ------------------------------------------------------------------ config

    def _default_main_cf(self) -> dict[str, str]:
        # Only smtpd's recipient validation reads this map: the "hosted" pipe
        # transport does the delivery (virtual(8) forbids $1 substitution, so it
        # cannot give every recipient its own Maildir without a user list).
        vmaps = "static:ok" if self.users is None else f"texthash:{self.etc}/vmailbox"
        if self.outside_sink is None:
            outside = "outside:"
        elif isinstance(self.outside_sink, int):
            outside = f"smtp:[{LOOPBACK}]:{self.outside_sink}"
        else:
            outside = self.outside_sink
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "myhostname": self.hostname,
            "mydestination": "",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "relayhost": "",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.root),
            "smtpd_banner": "$myhostname ESMTP Postfix",
            # Loopback tests: no reverse DNS (a CI box may have no resolver).
            "smtpd_peername_lookup": "no",
            "virtual_mailbox_domains": " ".join(self.hosted_domains),
            "virtual_mailbox_base": str(self.mail_dir),
            "virtual_mailbox_maps": vmaps,
            "virtual_transport": "hosted",
            "hosted_destination_recipient_limit": "1",
            "virtual_uid_maps": f"static:{VMAIL_UID}",
            "virtual_gid_maps": f"static:{VMAIL_GID}",
            "virtual_mailbox_limit": "0",
            "mailbox_size_limit": "0",
            "default_transport": outside,
            "relay_transport": outside,
            "local_transport": "error:5.1.1 no local delivery in the test instance",
            # Quick retries so deferred mail does not stall a test for minutes.
            "queue_run_delay": "2s",
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "4s",
            "smtp_connect_timeout": "5s",
        }

    def _master_cf(self) -> str:
        template = next((p.read_text() for p in MASTER_CF_TEMPLATES if p.is_file()), None)
        if template is None:
            template = _FALLBACK_MASTER_CF
        out: list[str] = []
        keep = False
        for line in template.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0].isspace():  # continuation of the previous service
                if keep:
                    out.append(line)
                continue
            fields = line.split()
            keep = (
                len(fields) >= 8
                and fields[1] in ("unix", "unix-dgram", "fifo")
                and fields[7] != "pipe"
            )
            if keep:
                fields[4] = "n"  # no chroot: nobody populates a chroot for this instance
                out.append(" ".join(fields))
        out.append("hosted unix - n n - - pipe")
        users = self.etc / "users" if self.users is not None else "-"
        out.append(
            f"  flags=DRXOhu user=nobody argv=/bin/sh {self.etc}/deliver.sh "
            f"{self.mail_dir} {users} ${{recipient}}"
        )
        out.append("outside unix - n n - - virtual")
        out.append(f"  {_o('virtual_mailbox_maps', f'static:{OUTSIDE_DIR}/')}")
        out.append(f"{LOOPBACK}:{self.smtpd_port} inet n - n - - smtpd")
        out.extend(f"  {_o(k, v)}" for k, v in self.smtpd_options.items())
        out.append(f"{LOOPBACK}:{self.reinject_port} inet n - n - - smtpd")
        out.extend(f"  {_o(k, v)}" for k, v in self.reinject_options.items())
        if self.extra_master_cf.strip():
            out.append(self.extra_master_cf.rstrip("\n"))
        return "\n".join(out) + "\n"

    def write_config(self) -> None:
        """(Re)write etc/ and create the directories; called by the constructor."""
        for d in (self.root, self.etc, self.queue_dir, self.data_dir, self.mail_dir):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.root, self.etc, self.queue_dir):
            os.chmod(d, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.data_dir, "postfix")
            os.chown(self.mail_dir, VMAIL_UID, VMAIL_GID)
        os.chmod(self.data_dir, 0o700)
        os.chmod(self.mail_dir, 0o755)

        deliver = self.etc / "deliver.sh"
        deliver.write_text(_DELIVER_SH)
        os.chmod(deliver, 0o755)
        users_file = self.etc / "users"
        if self.users is not None:
            users_file.write_text("".join(f"{u}\n" for u in self.users))
            (self.etc / "vmailbox").write_text("".join(f"{u} ok\n" for u in self.users))
        else:
            users_file.unlink(missing_ok=True)
        main = "".join(f"{k} = {v}\n" for k, v in self.main_cf.items())
        (self.etc / "main.cf").write_text(main)
        (self.etc / "master.cf").write_text(self._master_cf())
        # Postfix re-reads a config/table file (300 ms naps) until its mtime is
        # over a second old, to avoid half-written files: backdate ours.
        past = time.time() - 10
        for f in self.etc.iterdir():
            os.utime(f, (past, past))

    # ------------------------------------------------------------- lifecycle

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return _run_tty_stderr([_need_binary("postfix"), "-c", str(self.etc), *args], timeout)

    @property
    def running(self) -> bool:
        pid = self.master_pid()
        return pid is not None and _pid_alive(pid, str(self.etc))

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self, timeout: float = 30.0) -> Postfix:
        """Start the master and wait until both smtpd ports accept connections.

        Raises PostfixError with Postfix's own output and the log tail.  If an
        automatically chosen port was taken in the meantime, retries with new ports.
        """
        timeout = patience(timeout)
        if self._started:
            return self
        if os.geteuid() != 0:
            raise PostfixError("a private Postfix instance needs root")
        for attempt in range(3):
            mark = self.log_mark()
            try:
                return self._start_once(timeout)
            except PostfixError as e:
                # The master's own "bind ... Address already in use" reaches the log only
                # through postlogd, which may not be up yet when the master gives up: a
                # bare "mail system startup failed" is taken for a lost race too (a real
                # configuration error fails all three attempts alike).
                lost_race = "Address already in use" in self.log(
                    mark
                ) or "mail system startup failed" in str(e)
                if attempt == 2 or not lost_race or not (self._auto_smtpd or self._auto_reinject):
                    raise
                if self._auto_smtpd:
                    self.smtpd_port = free_port()
                if self._auto_reinject:
                    self.reinject_port = free_port()
                self.write_config()
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> Postfix:
        self._started = True
        _running.add(self)
        try:
            if self.dovecot is not None:
                self.dovecot.start()
            try:
                proc = self._postfix("start", timeout=timeout)
            except subprocess.TimeoutExpired as e:
                raise PostfixError(f"postfix start hung for {timeout}s\n{self.log_tail()}") from e
            if proc.returncode != 0:
                raise PostfixError(
                    f"postfix start exited {proc.returncode}:\n{proc.stdout}{proc.stderr}\n"
                    f"--- {self.log_path} ---\n{self.log_tail()}"
                )
            deadline = time.monotonic() + timeout
            for port in (self.smtpd_port, self.reinject_port):
                while True:
                    pid = self.master_pid()
                    # The master holds the listeners: an open port owned by
                    # another process means free_port() lost a race.
                    if pid is not None and listened_by(pid, port) and port_open(port):
                        break
                    if time.monotonic() > deadline:
                        raise PostfixError(
                            f"postfix never listened on 127.0.0.1:{port}\n{self.log_tail()}"
                        )
                    if pid is not None and not _pid_alive(pid, str(self.etc)):
                        raise PostfixError(f"postfix master died\n{self.log_tail()}")
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the instance; safe to call twice, before start, or after a failed start."""
        if not self._started:
            return
        pid = self.master_pid()
        try:
            if pid is not None and _pid_alive(pid, str(self.etc)):
                with contextlib.suppress(subprocess.TimeoutExpired, PostfixError):
                    self._postfix("stop", timeout=30)
                if not _wait_pid_gone(pid, str(self.etc), 10.0, kill=False):
                    with contextlib.suppress(subprocess.TimeoutExpired, PostfixError):
                        self._postfix("abort", timeout=15)
                    _wait_pid_gone(pid, str(self.etc), 5.0, kill=True)
        finally:
            if self.dovecot is not None:
                self.dovecot.stop()
            self._started = False
            _running.discard(self)

    def close(self) -> None:
        """``stop()`` and delete the instance's directory if it was made in /tmp."""
        self.stop()
        if self._own_root:
            cleanup_runtime_dir(self.root)
            with contextlib.suppress(OSError):
                if self.requested_root.is_symlink():
                    self.requested_root.unlink()

    def reload(self) -> None:
        """Re-read main.cf/master.cf (after ``write_config()``)."""
        proc = self._postfix("reload")
        if proc.returncode != 0:
            raise PostfixError(f"postfix reload failed:\n{proc.stdout}{proc.stderr}")

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"Postfix(root={str(self.root)!r}, smtpd_port={self.smtpd_port}, "
            f"reinject_port={self.reinject_port}, proxy_filter={self.proxy_filter!r})"
        )

    # ----------------------------------------------------------------- queue

    def flush(self) -> None:
        """``postqueue -f``: retry deferred mail now."""
        proc = subprocess.run(
            [_need_binary("postqueue"), "-c", str(self.etc), "-f"],
            capture_output=True,
            text=True,
            timeout=30,
            env=_clean_env(),
        )
        if proc.returncode != 0:
            raise PostfixError(f"postqueue -f failed:\n{proc.stdout}{proc.stderr}")

    def queue_ids(self) -> list[str]:
        """Queue IDs of every message still in the queue (read from the queue dirs)."""
        ids: list[str] = []
        for sub in ("maildrop", "incoming", "active", "deferred", "hold", "corrupt"):
            base = self.queue_dir / sub
            if not base.is_dir():
                continue
            for _dirpath, _dirs, files in os.walk(base):
                ids.extend(files)
        return sorted(set(ids))

    def mailq(self) -> list[dict[str, Any]]:
        """``postqueue -j``: one dict per queued message (queue_name, recipients...)."""
        proc = subprocess.run(
            [_need_binary("postqueue"), "-c", str(self.etc), "-j"],
            capture_output=True,
            text=True,
            timeout=30,
            env=_clean_env(),
        )
        if proc.returncode != 0:
            raise PostfixError(f"postqueue -j failed:\n{proc.stdout}{proc.stderr}")
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]

    def wait_queue_empty(self, timeout: float = 20.0, *, flush: bool = False) -> None:
        """Poll until nothing is queued; ``flush=True`` also retries deferred mail."""
        timeout = patience(timeout)
        deadline = time.monotonic() + timeout
        if flush:
            self.flush()
        while self.queue_ids():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"queue not empty after {timeout}s: {self._describe_queue()}\n"
                    f"--- log tail ---\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _describe_queue(self) -> str:
        try:
            return json.dumps(self.mailq(), indent=1)
        except (PostfixError, subprocess.TimeoutExpired, ValueError):
            return repr(self.queue_ids())

    # ------------------------------------------------------------- mailboxes

    def maildir(self, address: str) -> Path:
        """The Maildir of a hosted recipient (Postfix folds the address to lower case)."""
        local, sep, domain = address.strip().strip("<>").rpartition("@")
        if not sep or not local or "/" in address or local.startswith("."):
            raise ValueError(f"not a deliverable hosted address: {address!r}")
        return self.mail_dir / domain.lower() / local.lower()

    def messages(self, address: str) -> list[bytes]:
        """Raw delivered messages (new/ and cur/), oldest first."""
        return [f.read_bytes() for f in _maildir_files(self.maildir(address))]

    def outside_maildir(self) -> Path:
        return self.mail_dir / OUTSIDE_DIR

    def outside_messages(self) -> list[bytes]:
        """Everything Postfix tried to send to non-hosted domains (incl. bounces)."""
        return [f.read_bytes() for f in _maildir_files(self.outside_maildir())]

    def count_all(self) -> int:
        """Messages delivered anywhere in this instance (hosted + outside)."""
        n = 0
        for dirpath, _dirs, files in os.walk(self.mail_dir):
            if Path(dirpath).name in ("new", "cur"):
                n += len(files)
        return n

    def all_messages(self) -> dict[str, list[bytes]]:
        """{"local@domain" or "@outside": [raw messages]} for every non-empty Maildir."""
        out: dict[str, list[bytes]] = {}
        for new in sorted(self.mail_dir.rglob("new")):
            md = new.parent
            rel = md.relative_to(self.mail_dir)
            key = OUTSIDE_DIR if rel.parts == (OUTSIDE_DIR,) else "@".join(reversed(rel.parts))
            msgs = [f.read_bytes() for f in _maildir_files(md)]
            if msgs:
                out[key] = msgs
        return out

    def _wait(self, get: Any, n: int, timeout: float, what: str) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            msgs = get()
            if len(msgs) >= n:
                return msgs
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: {len(msgs)} message(s) after {timeout}s, wanted {n}\n"
                    f"queue: {self._describe_queue()}\n--- log tail ---\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def wait_for_messages(self, address: str, n: int = 1, timeout: float = 20.0) -> list[bytes]:
        """Poll until ``address`` has at least ``n`` messages; AssertionError + log otherwise."""
        timeout = patience(timeout)
        return self._wait(lambda: self.messages(address), n, timeout, address)

    def wait_for_outside(self, n: int = 1, timeout: float = 20.0) -> list[bytes]:
        """Like ``wait_for_messages`` for the outside catch-all Maildir."""
        timeout = patience(timeout)
        return self._wait(self.outside_messages, n, timeout, "outside catch-all")

    # ------------------------------------------------------------------- log

    def log(self, since: int = 0) -> str:
        """The instance's maillog, optionally from byte offset ``since`` (see ``log_mark``)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """Current end of the log, for ``log(since=...)`` / ``wait_for_log(since=...)``."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log(), lines) or "(postfix.log is empty)"

    def wait_for_log(
        self, pattern: str | re.Pattern[str], timeout: float = 20.0, *, since: int = 0
    ) -> re.Match[str]:
        """Poll the log until ``pattern`` (regex) matches; logging is asynchronous."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log(since))
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{rx.pattern!r} not in postfix.log after {timeout}s\n{self.log_tail()}"
                )
            time.sleep(0.05)


@atexit.register
def _stop_all() -> None:
    """Never leave a master running (or /tmp dirs behind) after the test process exits."""
    for pf in list(_running):
        with contextlib.suppress(Exception):
            pf.stop()
    for d in list(_created_runtime_dirs):
        cleanup_runtime_dir(d)
