"""Generate a Maildir++ mail store for the retention benchmark (default 1,000,000 messages
in 2,000 mailboxes), with times spread so that the shipped rules select a realistic part.

Why it is built this way:

* received dates (mtime) are set with futimens: an exponential age distribution with a
  mean of 60 days before the reference time ``ref`` (so about 22% of mail is older than
  the 90 days of rule idle-60d-older-90d);
* the time in Trash (ctime) cannot be set, so Trash is written in two phases a few
  seconds apart: half before ``t_split``, half after. The benchmark runs maild with a fake
  clock, ``now = ref = t_split + 7 days``, so rule trash-7d (ctime older than 7 days)
  selects exactly the first half, and ``find ! -newerct @t_split`` does the same;
* last logins (access.tsv): 55% of mailboxes used within 30 days, 25% idle 60-90 days,
  20% idle longer (90-400 days); every 20th user is a root mailbox (root-mailboxes), so
  rule root-idle-90d-shrink has about 20 mailboxes to shrink to 1 MB;
* files are tiny (maild and find read only names and inodes); the size the quota counts is
  in the Maildir++ name (",S=<size>"), log-normal around 30 KB, and in maildirsize.

    python -m bench.gen_store DIR [--mailboxes 2000] [--messages 1000000] [--seed 1]

DIR gets vmail/<domain>/<user>/Maildir/..., root-mailboxes, access.tsv, manifest.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DAY = 86400.0
FOLDERS = (("INBOX", 0.60), ("Sent", 0.18), ("Archive", 0.14), ("Trash", 0.08))
CONTENT = b"From: <someone@example.org>\nTo: <user@example.net>\nSubject: bench\n\nbody\n"
TEMPLATE = "vmail/%d/%n/Maildir"


@dataclass
class Manifest:
    """What the benchmark needs to know about a generated store."""

    root: str
    template: str  # mailbox path template, absolute
    mailboxes: int
    messages: int
    ref: float  # the fake "now" the benchmark runs maild with
    t_split: int  # Trash files with ctime before this are older than 7 days at ref
    trash_old: int  # Trash messages written before t_split
    seconds: float


def user(i: int) -> str:
    return f"u{i:04d}@d{i % 20:02d}.example"


def _folder_dir(mailbox: Path, folder: str) -> Path:
    return mailbox if folder == "INBOX" else mailbox / f".{folder}"


def _size(rnd: random.Random) -> int:
    return max(300, int(rnd.lognormvariate(math.log(30_000), 1.0)))


def _write(d: Path, rnd: random.Random, mtime: float, serial: int) -> int:
    size = _size(rnd)
    name = f"{int(mtime)}.M{serial}P1.bench,S={size},W={size + 40}:2,S"
    fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, CONTENT)
        ns = int(mtime * 1e9)
        os.utime(fd, ns=(ns, ns))
    finally:
        os.close(fd)
    return size


def generate(
    root: Path,
    *,
    mailboxes: int = 2000,
    messages: int = 1_000_000,
    seed: int = 1,
    progress: bool = True,
) -> Manifest:
    """Write the store; returns (and saves as manifest.json) what the benchmark needs."""
    started = time.monotonic()
    rnd = random.Random(seed)
    root = root.absolute()
    if (root / "vmail").exists():
        raise SystemExit(f"{root}/vmail exists: remove it or use another directory")
    root.mkdir(parents=True, exist_ok=True)
    # a ref far enough ahead that phase B (after t_split) is surely younger than 7 days
    per = [max(1, int(messages / mailboxes * rnd.uniform(0.5, 1.5))) for _ in range(mailboxes)]
    scale = messages / sum(per)
    per = [max(1, int(n * scale)) for n in per]
    per[-1] += messages - sum(per)
    now0 = time.time()
    ref_guess = now0 + 7 * DAY  # adjusted to t_split + 7 d below; ages are relative
    plan: list[tuple[Path, list[tuple[str, str, float]]]] = []
    for i in range(mailboxes):
        local, _, domain = user(i).partition("@")
        mb = root / TEMPLATE.replace("%d", domain).replace("%n", local)
        files = []
        for _ in range(per[i]):
            r = rnd.random()
            acc = 0.0
            folder = FOLDERS[-1][0]
            for name, share in FOLDERS:
                acc += share
                if r < acc:
                    folder = name
                    break
            sub = "new" if folder == "INBOX" and rnd.random() < 0.15 else "cur"
            age = min(rnd.expovariate(1 / (60 * DAY)), 1000 * DAY)
            files.append((folder, sub, age))
        plan.append((mb, files))
    serial = 0
    total = 0
    sizes: dict[Path, tuple[int, int]] = {}
    trash_late: list[tuple[Path, Path, float]] = []
    trash_old = 0
    for k, (mb, files) in enumerate(plan):
        for folder, _ in FOLDERS:
            for sub in ("cur", "new", "tmp"):
                (_folder_dir(mb, folder) / sub).mkdir(parents=True, exist_ok=True)
        b = c = 0
        for j, (folder, sub, age) in enumerate(files):
            d = _folder_dir(mb, folder) / sub
            if folder == "Trash" and j % 2:
                trash_late.append((mb, d, age))
                continue
            serial += 1
            b += _write(d, rnd, ref_guess - age, serial)
            c += 1
            trash_old += folder == "Trash"
        sizes[mb] = (b, c)
        total += len(files)
        if progress and k % 200 == 0:
            print(f"gen_store: {k}/{mailboxes} mailboxes", file=sys.stderr, flush=True)
    # phase B: the other half of Trash, moved there "after" t_split
    t_split = int(time.time()) + 2
    while time.time() < t_split + 1.0:
        time.sleep(0.05)
    for mb, d, age in trash_late:
        serial += 1
        size = _write(d, rnd, ref_guess - age, serial)
        b, c = sizes[mb]
        sizes[mb] = (b + size, c + 1)
    for mb, (b, c) in sizes.items():
        (mb / "maildirsize").write_text(f"1073741824S\n{b:12d} {c:12d}\n")
    users = [user(i) for i in range(mailboxes)]
    (root / "root-mailboxes").write_text("".join(f"{u}\n" for u in users[::20]))
    ref = t_split + 7 * DAY
    with open(root / "access.tsv", "w") as f:
        for u in users:
            r = rnd.random()
            if r < 0.55:
                idle = rnd.uniform(0, 30)
            elif r < 0.80:
                idle = rnd.uniform(61, 89)
            else:
                idle = rnd.uniform(91, 400)
            f.write(f"{u}\t{ref - idle * DAY:.0f}\n")
    # The mtimes were written relative to ref_guess, which is earlier than ref by the
    # generation time (a minute or two): every received age is that much larger, which
    # no rule can notice (their ages are days).
    man = Manifest(
        root=str(root),
        template=str(root / TEMPLATE),
        mailboxes=mailboxes,
        messages=total,
        ref=ref,
        t_split=t_split,
        trash_old=trash_old,
        seconds=time.monotonic() - started,
    )
    (root / "manifest.json").write_text(json.dumps(asdict(man), indent=1) + "\n")
    return man


def load(root: Path) -> Manifest:
    return Manifest(**json.loads((root / "manifest.json").read_text()))


def main(argv: list[str] | None = None) -> Manifest:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--mailboxes", type=int, default=2000)
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    man = generate(Path(args.dir), mailboxes=args.mailboxes, messages=args.messages, seed=args.seed)
    print(json.dumps(asdict(man), indent=1))
    return man


if __name__ == "__main__":
    main()
