"""A throwaway Dovecot for the retention integration tests.

Its own config file, loopback ports, mail owned by uid/gid 65534, passwd-file passdb and
userdb, and maild's quota override file as a second userdb (the wiring docs/retention.md
describes). Deliveries go through the real dovecot-lda with the quota plugin, so a
delivery over the quota is really refused.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MAIL_UID = 65534
LDA_PATHS = ("/usr/lib/dovecot/dovecot-lda", "/usr/libexec/dovecot/dovecot-lda")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_lda() -> str | None:
    return next((p for p in LDA_PATHS if os.access(p, os.X_OK)), None)


CONF = """
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
protocols = imap pop3
listen = 127.0.0.1
mail_location = maildir:{root}/vmail/%d/%n/Maildir
mail_uid = {uid}
mail_gid = {uid}
first_valid_uid = 1
first_valid_gid = 1
default_internal_user = nobody
default_internal_group = nogroup
default_login_user = nobody
mail_plugins = quota
postmaster_address = postmaster@hosted.example
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/users
  result_success = continue-ok
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {quota_file}
  skip = notfound
}}
plugin {{
  quota = maildir:User quota
  last_login_dict = file:{root}/lastlogin/dict
}}
protocol imap {{
  mail_plugins = $mail_plugins last_login
}}
protocol pop3 {{
  mail_plugins = $mail_plugins last_login
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""


class Dovecot:
    PASSWORD = "secret"

    def __init__(self, users: dict[str, str]):
        """users: name -> extra userdb fields (e.g. "userdb_quota_rule=*:storage=10M")."""
        self.root = Path(tempfile.mkdtemp(prefix="maild-dovecot-"))
        os.chmod(self.root, 0o755)  # the mail user must reach its mail below it
        self.users = users
        self.imap_port = free_port()
        self.pop3_port = free_port()
        self.conf = self.root / "dovecot.conf"
        self.log = self.root / "dovecot.log"
        self.mail = self.root / "vmail"
        self.quota_file = self.root / "maild" / "dovecot-quota.passwd"
        self.last_login = self.root / "lastlogin" / "dict"
        self.lda = find_lda()

    def start(self) -> None:
        for d in ("run", "state", "vmail", "lastlogin", "maild"):
            (self.root / d).mkdir(exist_ok=True)
        for d in ("vmail", "lastlogin"):
            os.chown(self.root / d, MAIL_UID, MAIL_UID)
        self.conf.write_text(
            CONF.format(
                root=self.root,
                uid=MAIL_UID,
                imap=self.imap_port,
                pop3=self.pop3_port,
                quota_file=self.quota_file,
            )
        )
        (self.root / "passwd").write_text(
            "".join(f"{u}:{{PLAIN}}{self.PASSWORD}\n" for u in self.users)
        )
        (self.root / "users").write_text(
            "".join(
                f"{u}::{MAIL_UID}:{MAIL_UID}::{self.home(u)}::{extra}\n"
                for u, extra in self.users.items()
            )
        )
        self.quota_file.write_text("")
        # The master daemonizes and its children keep inherited descriptors: no pipes here.
        with open(self.root / "startup.err", "wb") as err:
            rc = subprocess.run(
                ["dovecot", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                check=False,
            ).returncode
        if rc != 0:
            raise RuntimeError("dovecot did not start: " + (self.root / "startup.err").read_text())
        deadline = time.monotonic() + 10
        while not self._listening():
            if time.monotonic() > deadline:
                raise RuntimeError("dovecot did not start:\n" + self.log.read_text())
            time.sleep(0.05)

    def _listening(self) -> bool:
        for port in (self.imap_port, self.pop3_port):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return False
        return True

    def stop(self) -> None:
        subprocess.run(
            ["doveadm", "-c", str(self.conf), "stop"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        pid_file = self.root / "run" / "master.pid"
        deadline = time.monotonic() + 10
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def home(self, user: str) -> Path:
        local, _, domain = user.partition("@")
        return self.mail / domain / local

    def maildir(self, user: str) -> Path:
        return self.home(user) / "Maildir"

    def make_maildir(self, user: str, maildirsize: str | None = None) -> Path:
        md = self.maildir(user)
        for sub in ("cur", "new", "tmp"):
            (md / sub).mkdir(parents=True, exist_ok=True)
        if maildirsize is not None:
            (md / "maildirsize").write_text(maildirsize)
        for dirpath, dirs, files in os.walk(self.mail):
            for n in (dirpath, *(os.path.join(dirpath, x) for x in dirs + files)):
                os.chown(n, MAIL_UID, MAIL_UID)
        return md

    def deliver(self, user: str, size: int, subject: str = "test") -> int:
        """dovecot-lda; 0 delivered, 77 refused (e.g. over quota), 75 temporary failure."""
        msg = (
            (
                f"From: sender@example.org\r\nTo: {user}\r\nSubject: {subject}\r\n"
                f"Message-ID: <{time.time_ns()}@example.org>\r\n\r\n"
            ).encode()
            + b"x" * size
            + b"\r\n"
        )
        p = subprocess.run(
            [self.lda, "-c", str(self.conf), "-e", "-d", user],
            input=msg,
            capture_output=True,
            check=False,
        )
        return p.returncode

    def doveadm(self, *args: str) -> str:
        p = subprocess.run(
            ["doveadm", "-c", str(self.conf), *args], capture_output=True, text=True, check=True
        )
        return p.stdout

    def userdb_field(self, user: str, field: str) -> str:
        return self.doveadm("user", "-f", field, user).strip()

    def quota_limit_kb(self, user: str) -> str:
        """The STORAGE limit `doveadm quota get` reports (kB), as Dovecot enforces it."""
        for line in self.doveadm("quota", "get", "-u", user).splitlines():
            fields = line.split()
            if "STORAGE" in fields:
                return fields[fields.index("STORAGE") + 2]
        raise AssertionError("no STORAGE line from doveadm quota get")
