"""Retention: a full run of the shipped rules versus ``find`` doing the same selection, and
a run over an unchanged store.

Why this shape: the targets are ratios on one machine (full run <= 1.5x find's time; an
unchanged re-run <= 20% of a full run), with a warm page cache for both sides (find and
maild alternate, so neither pays for the other's cold reads).

* the store comes from bench/gen_store.py (default 1,000,000 messages, 2,000 mailboxes);
* maild runs the three shipped rules (trash-7d, idle-60d-older-90d, root-idle-90d-shrink)
  with a fake clock (``now`` = the store's ``ref``, see gen_store.py) through its own
  Runner, in a worker subprocess (``--worker``), so that ``--maild-src`` can point at a
  scratch tree with a proposal applied;
* "selection": maild ``--dry-run`` of the three rules (it scans and plans exactly as a real
  run, and deletes nothing) versus find: Trash files with ``! -newerct @t_split``, files of
  idle mailboxes with ``! -newermt @(ref - 90 d)``, and every file of the idle root
  mailboxes with its time and size, sorted (what "oldest first until 1 MB" needs). The
  counts must agree (checked);
* "real run": the three rules for real (deleting, every deletion recorded), once;
  "second run": again, 2.5 s later (the directories the real run changed are read again;
  maild summarises a directory only once its last change is 2 s old);
  "unchanged": further runs, nothing changed since (directory summaries apply).

    python -m bench.retention [--store DIR] [--mailboxes 2000] [--messages 1000000] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from bench.common import REPO, SHIPPED_POLICY, Stat, emit, log, machine, rotate, table, verdict
from bench.gen_store import Manifest, generate, load

DAY = 86400.0
TARGET_FIND_RATIO = 1.5
TARGET_UNCHANGED = 0.20
RACY_WAIT = 2.5  # > maild.retention.sweep.RACY_SECONDS


def retention_policy(man: Manifest, workdir: Path) -> dict[str, Any]:
    """The shipped [retention] section, pointed at the generated store."""
    from tests.harness.maild import render

    doc = tomllib.loads(SHIPPED_POLICY.read_text())
    ret = doc["retention"]
    ret["store"]["path"] = man.template
    ret["store"]["root_mailboxes_file"] = str(Path(man.root) / "root-mailboxes")
    ret["access"]["dovecot_log"] = str(workdir / "mail.log")
    ret.setdefault("quota", {})["dovecot_userdb"] = str(workdir / "dovecot-quota.passwd")
    (workdir / "mail.log").write_text("")
    policy = {
        "server": {**doc["server"], "state": str(workdir / "state" / "maild.db")},
        "postmaster": doc["postmaster"],
        "retention": ret,
    }
    (workdir / "policies.toml").write_text(render(policy))
    return policy


# --------------------------------------------------------------------------- worker


async def _worker(
    config: str, now: float, rules: list[str], dry_run: bool, seed_access: str | None
) -> dict[str, Any]:
    from maild.components import load as load_config
    from maild.components import open_store
    from maild.retention.config import retention_of
    from maild.retention.jobs import Runner
    from maild.retention.state import record_access

    cfg = load_config(config)
    rcfg = retention_of(cfg)
    store = await open_store(cfg.server.state, cfg.path)
    try:
        if seed_access:
            rows = []
            for line in Path(seed_access).read_text().splitlines():
                u, t = line.split("\t")
                rows.append((u, float(t), "imap"))
            await record_access(store, rows)
            return {"seeded": len(rows)}
        runner = Runner(rcfg, store, clock=lambda: now)
        out: dict[str, Any] = {"rules": {}}
        t0 = time.perf_counter()
        for name in rules:
            t1 = time.perf_counter()
            rep = await runner.run(
                name,
                dry_run=dry_run,
                now=now,
                trigger="bench",
                on_plan=(lambda ev: None) if dry_run else None,
            )
            out["rules"][name] = {
                "seconds": time.perf_counter() - t1,
                "status": rep.status,
                "mailboxes": rep.mailboxes,
                "scanned": rep.scanned,
                "cached_dirs": rep.cached_dirs,
                "deleted": rep.deleted,
                "shrunk": rep.shrunk,
                "errors": rep.errors,
            }
        out["seconds"] = time.perf_counter() - t0
        return out
    finally:
        await store.close()


def run_worker(
    config: Path,
    now: float,
    rules: list[str],
    *,
    dry_run: bool,
    src: str | None,
    seed_access: str | None = None,
) -> dict[str, Any]:
    """One maild measurement in a fresh interpreter (maild from ``src`` if given)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([src or str(REPO), str(REPO)])
    # -P: "python -m" would put the working directory (this checkout) first on sys.path,
    # ahead of PYTHONPATH, and run this checkout's maild whatever src says
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "bench.retention",
        "--worker",
        str(config),
        "--now",
        repr(now),
        "--rules",
        ",".join(rules),
    ]
    if dry_run:
        cmd.append("--dry-run")
    if seed_access:
        cmd += ["--seed-access", seed_access]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"retention worker failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- find


def find_selection(
    man: Manifest, roots: set[str], access: dict[str, float]
) -> tuple[float, dict[str, int]]:
    """What find needs to select what the three rules select; (seconds, counts)."""
    idle60 = [u for u, t in access.items() if man.ref - t > 60 * DAY]
    idle90_root = [u for u, t in access.items() if man.ref - t > 90 * DAY and u in roots]

    def path(u: str) -> str:
        local, _, domain = u.partition("@")
        return man.template.replace("%d", domain).replace("%n", local)

    msgs = ["(", "-path", "*/cur/*", "-o", "-path", "*/new/*", ")", "-type", "f"]
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    # (i) Trash for 7 days: ctime before t_split (= ref - 7 d). The shell's glob names the
    # Trash folders, so find reads only them (walking all of vmail/ is 3x slower).
    trash = man.template.replace("%d", "*").replace("%n", "*") + "/.Trash"
    out = subprocess.run(
        ["sh", "-c", f'find {trash} "$@"', "find", *msgs, "!", "-newerct", f"@{man.t_split}"],
        capture_output=True,
        check=True,
    ).stdout
    counts["trash-7d"] = out.count(b"\n")
    # (ii) idle 60 d: received more than 90 d ago
    cutoff = int(man.ref - 90 * DAY)
    out = (
        subprocess.run(
            ["find", *[path(u) for u in idle60], *msgs, "!", "-newermt", f"@{cutoff}"],
            capture_output=True,
            check=True,
        ).stdout
        if idle60
        else b""
    )
    counts["idle-60d-older-90d"] = out.count(b"\n")
    # (iii) root mailboxes idle 90 d: every file with time and size, oldest first
    if idle90_root:
        f = subprocess.Popen(
            ["find", *[path(u) for u in idle90_root], *msgs, "-printf", "%T@ %s %p\n"],
            stdout=subprocess.PIPE,
        )
        s = subprocess.run(["sort", "-n"], stdin=f.stdout, capture_output=True, check=True)
        f.wait()
        counts["root-idle-90d-shrink (listed)"] = s.stdout.count(b"\n")
    return time.perf_counter() - t0, counts


# --------------------------------------------------------------------------- main

RULES = ["trash-7d", "idle-60d-older-90d", "root-idle-90d-shrink"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--store",
        default=None,
        help="a store made by bench.gen_store (reused "
        "for the selection runs; regenerated for the deleting runs unless --keep)",
    )
    ap.add_argument("--mailboxes", type=int, default=2000)
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--maild-src", default=None, help="run maild from this tree")
    ap.add_argument(
        "--compare-src",
        default=None,
        help="also measure maild from this tree (a proposal applied), as maild@patched",
    )
    ap.add_argument("--no-delete", action="store_true", help="selection only")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    # worker mode (internal)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--now", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--rules", default="", help=argparse.SUPPRESS)
    ap.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed-access", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        res = asyncio.run(
            _worker(
                args.worker,
                args.now,
                [r for r in args.rules.split(",") if r],
                args.dry_run,
                args.seed_access,
            )
        )
        print(json.dumps(res))
        return res

    info = machine()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="maild-bench-ret-"))
    workdir.mkdir(parents=True, exist_ok=True)
    own_store = args.store is None
    store_dir = Path(args.store) if args.store else workdir / "store"
    if not (store_dir / "manifest.json").exists():
        log(f"generating {args.messages:,} messages in {args.mailboxes:,} mailboxes in {store_dir}")
        generate(store_dir, mailboxes=args.mailboxes, messages=args.messages, progress=False)
    man = load(store_dir)
    log(f"store: {man.messages:,} messages in {man.mailboxes:,} mailboxes")
    retention_policy(man, workdir)
    config = workdir / "policies.toml"
    state = workdir / "state"
    shutil.rmtree(state, ignore_errors=True)
    run_worker(
        config,
        man.ref,
        [],
        dry_run=True,
        src=args.maild_src,
        seed_access=str(store_dir / "access.tsv"),
    )
    template = workdir / "state.seeded"
    shutil.rmtree(template, ignore_errors=True)
    shutil.copytree(state, template)
    access = {
        u: float(t)
        for u, t in (ln.split("\t") for ln in (store_dir / "access.tsv").read_text().splitlines())
    }
    roots = set((store_dir / "root-mailboxes").read_text().split())

    srcs = {"maild": args.maild_src}
    if args.compare_src:
        srcs["maild@patched"] = args.compare_src
    find_t = Stat()
    sel = {k: Stat() for k in srcs}
    ratios = {k: Stat() for k in srcs}
    per_rule: dict[str, dict[str, Stat]] = {k: {r: Stat() for r in RULES} for k in srcs}
    find_counts: dict[str, int] = {}
    counts: dict[str, dict[str, int]] = {}
    # warm the page cache for both sides, unmeasured
    find_selection(man, roots, access)
    for rep in range(args.reps):
        got: dict[str, float] = {}
        for side in rotate(["find", *srcs], rep):
            if side == "find":
                got["find"], find_counts = find_selection(man, roots, access)
                find_t.add(got["find"])
            else:
                res = run_worker(config, man.ref, RULES, dry_run=True, src=srcs[side])
                got[side] = res["seconds"]
                sel[side].add(res["seconds"])
                for r in RULES:
                    per_rule[side][r].add(res["rules"][r]["seconds"])
                counts[side] = {r: res["rules"][r]["deleted"] for r in RULES}
                counts[side]["root-idle-90d-shrink (shrunk)"] = res["rules"][RULES[2]]["shrunk"]
            log(f"   rep {rep + 1} {side}: {got[side]:.2f} s")
        for k in srcs:
            ratios[k].add(got[k] / got["find"])
    maild_counts = counts["maild"]
    mismatch = [
        f"{k}: {r}" for k, c in counts.items() for r in RULES[:2] if find_counts.get(r) != c.get(r)
    ]
    mismatch += [f"{k}: {r}" for k, c in counts.items() for r in c if c[r] != maild_counts[r]]

    real: dict[str, dict[str, Any]] = {}
    second: dict[str, dict[str, Any]] = {}
    unchanged = {k: Stat() for k in srcs}
    unchanged_ratio = {k: Stat() for k in srcs}
    for n, (side, src) in enumerate(srcs.items() if not args.no_delete else ()):
        if n:  # the previous real run changed the store: a fresh one, same seed and shape
            if not own_store:
                log("   --compare-src with --store: the deleting runs use a regenerated store")
            shutil.rmtree(store_dir, ignore_errors=True)
            generate(store_dir, mailboxes=man.mailboxes, messages=man.messages, progress=False)
            man = load(store_dir)
            retention_policy(man, workdir)
            shutil.rmtree(state, ignore_errors=True)
            run_worker(
                config,
                man.ref,
                [],
                dry_run=True,
                src=src,
                seed_access=str(store_dir / "access.tsv"),
            )
        else:
            shutil.rmtree(state, ignore_errors=True)
            shutil.copytree(template, state)
        real[side] = run_worker(config, man.ref, RULES, dry_run=False, src=src)
        log(f"   {side} real run: {real[side]['seconds']:.2f} s")
        # maild trusts a directory summary only if the directory last changed more than
        # RACY_SECONDS (2 s, maild/retention/sweep.py) before it was read (mtimes are
        # coarse). Runs are hours apart in production; here the second run would start
        # within 2 s of the real run's last deletions, leave those directories
        # unsummarised, and the first "unchanged" run would re-read them.
        time.sleep(RACY_WAIT)
        second[side] = run_worker(config, man.ref, RULES, dry_run=False, src=src)
        log(f"   {side} second run: {second[side]['seconds']:.2f} s")
        for rep in range(args.reps):
            res = run_worker(config, man.ref, RULES, dry_run=False, src=src)
            unchanged[side].add(res["seconds"])
            unchanged_ratio[side].add(res["seconds"] / sel[side].median)
            log(f"   {side} unchanged run {rep + 1}: {res['seconds']:.2f} s")
    if real and (own_store or args.compare_src):  # changed by the real run: never reuse it
        shutil.rmtree(store_dir, ignore_errors=True)

    cmd = "python -m bench.retention " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = [["find (the same selection)", find_t.fmt(".2f", " s"), "1.00x"]]
    for k in srcs:
        rows.append(
            [
                f"{k} full run, selection (dry run, 3 rules)",
                sel[k].fmt(".2f", " s"),
                ratios[k].fmt(".2f", "x"),
            ]
        )
        rows += [[f"  of which {r}", per_rule[k][r].fmt(".2f", " s"), ""] for r in RULES]
    for k in real:
        rows.append(
            [
                f"{k} real run (deletes, records each deletion)",
                f"{real[k]['seconds']:.2f} s",
                f"{real[k]['seconds'] / find_t.median:.2f}x",
            ]
        )
        rows.append(
            [
                f"{k} second run (re-reads what the real run changed)",
                f"{second[k]['seconds']:.2f} s",
                f"{second[k]['seconds'] / find_t.median:.2f}x",
            ]
        )
        rows.append(
            [
                f"{k} run over an unchanged store",
                unchanged[k].fmt(".2f", " s"),
                f"{unchanged[k].median / find_t.median:.2f}x",
            ]
        )
    chosen = ", ".join(f"{k} {v:,}" for k, v in maild_counts.items())
    md = [
        f"Measured {info['date']} with `{cmd.strip()}`: {man.messages:,} messages in "
        f"{man.mailboxes:,} mailboxes (bench/gen_store.py), warm page cache, {args.reps} "
        "repetitions alternated; median (min-max).",
        "",
        table(["run", "time", "vs find"], rows),
        "",
        f"Selected by maild: {chosen}. find: "
        + ", ".join(f"{k} {v:,}" for k, v in find_counts.items())
        + (
            ". **Counts differ: " + ", ".join(mismatch) + "**"
            if mismatch
            else " (the delete rules' counts agree)."
        ),
        "",
    ]
    trows = []
    for k in srcs:
        trows.append(
            [
                f"full run <= 1.5x find ({k})",
                ratios[k].fmt(".2f", "x"),
                verdict(ratios[k].median <= TARGET_FIND_RATIO),
            ]
        )
        if k in real:
            trows.append(
                [
                    f"unchanged run <= 20% of a full run ({k})",
                    unchanged_ratio[k].fmt(".0%"),
                    verdict(unchanged_ratio[k].median <= TARGET_UNCHANGED),
                ]
            )
    md.append(table(["target", "measured", "status"], trows))
    text = "\n".join(md) + "\n"
    result = {
        "benchmark": "retention",
        "machine": info,
        "command": cmd.strip(),
        "manifest": man.__dict__,
        "find": find_t.as_dict(),
        "maild": sel["maild"].as_dict(),
        "ratio": ratios["maild"].as_dict(),
        "selection": {k: v.as_dict() for k, v in sel.items()},
        "ratios": {k: v.as_dict() for k, v in ratios.items()},
        "per_rule": {k: {r: v.as_dict() for r, v in d.items()} for k, d in per_rule.items()},
        "find_counts": find_counts,
        "maild_counts": maild_counts,
        "mismatch": mismatch,
        "real": real.get("maild", {}),
        "real_all": real,
        "second": second,
        "unchanged": {k: v.as_dict() for k, v in unchanged.items()},
        "unchanged_ratio": unchanged_ratio["maild"].as_dict(),
        "unchanged_ratios": {k: v.as_dict() for k, v in unchanged_ratio.items()},
        "markdown": text,
    }
    return emit(result, text, args.json)


if __name__ == "__main__":
    main()
