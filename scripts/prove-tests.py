#!/usr/bin/env python3
"""Prove that the tests of issue 20 catch the behaviour they name, by deliberate mutation.

Reads scripts/deliberate-mutations.toml: a list of [[mutation]] tables, each naming a test
(`test`, `claim`), one small change to the production code (`file`, `old`, `new`: `old` must
occur exactly once in `file`; optional [[mutation.also]] tables add further edits that belong
to the same mutation, for a rule the code checks in two places), what the change breaks
(`breaks`) and the command that runs only that test from the repository root (`run`).

For each selected entry the script applies the mutation, runs `run` (with a timeout; its
output goes to target/prove-tests/<n>.log), records whether the test FAILED (a non-zero exit
or a timeout counts as failed, i.e. the mutation was caught), and always writes the original
bytes of every mutated file back (try/finally, also on Ctrl-C). It prints a markdown table
`| test | mutation (breaks) | failed |` as results come in and writes it to
target/prove-tests/table.md. A mutation that does not compile is reported as such, never as
caught. The exit status is non-zero if any mutation was not caught or did not compile.

It refuses to mutate a file with uncommitted changes (git status --porcelain) unless
--dirty-ok is given: the original bytes are restored either way, but a tree with work in it
is not the place to start.

Usage:
    scripts/prove-tests.py --check            verify every `old` occurs once and differs from `new`
    scripts/prove-tests.py                    run every entry
    scripts/prove-tests.py --only picker.rs   only entries whose `test` contains the text
    scripts/prove-tests.py --ids 30-35,43     only these entries (numbers as --list shows them)
    scripts/prove-tests.py --timeout 1800 --dirty-ok
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "scripts" / "deliberate-mutations.toml"
OUT = ROOT / "target" / "prove-tests"
REQUIRED = ("test", "claim", "file", "old", "new", "breaks", "run")


def load(path: Path) -> list[dict]:
    with path.open("rb") as f:
        data = tomllib.load(f)
    entries = data.get("mutation", [])
    if not isinstance(entries, list):
        raise SystemExit(f"{path}: `mutation` must be an array of tables ([[mutation]])")
    return entries


def edits_of(entry: dict) -> list[tuple[str, str, str]]:
    """Every (file, old, new) edit of an entry: the main one, then its `also` edits."""
    edits = [(entry["file"], entry["old"], entry["new"])]
    for extra in entry.get("also", []):
        edits.append((extra["file"], extra["old"], extra["new"]))
    return edits


def problems_of(n: int, entry: dict) -> list[str]:
    label = f"#{n} ({entry.get('test', '?')})"
    missing = [k for k in REQUIRED if not isinstance(entry.get(k), str) or not entry.get(k)]
    if missing:
        return [f"{label}: missing or empty keys: {', '.join(missing)}"]
    out = []
    for k, extra in enumerate(entry.get("also", [])):
        for key in ("file", "old", "new"):
            if not isinstance(extra.get(key), str) or not extra.get(key):
                out.append(f"{label}: also[{k}] lacks `{key}`")
    if out:
        return out
    for file, old, new in edits_of(entry):
        path = ROOT / file
        if old == new:
            out.append(f"{label}: `new` equals `old` in {file}")
        if not path.is_file():
            out.append(f"{label}: no such file {file}")
            continue
        text = path.read_text(encoding="utf-8")
        count = text.count(old)
        if count != 1:
            first = old.strip().splitlines()[0] if old.strip() else old
            out.append(f"{label}: `old` occurs {count} times in {file} (want 1): {first!r}")
    return out


def dirty_files(files: set[str]) -> list[str]:
    """The files among `files` that git reports as changed or untracked."""
    r = subprocess.run(
        ["git", "status", "--porcelain", "--", *sorted(files)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    dirty = []
    for line in r.stdout.splitlines():
        if len(line) > 3:
            dirty.append(line[3:].split(" -> ")[-1])
    return dirty


def cell(s: str) -> str:
    return " ".join(s.split()).replace("|", "\\|")


def row(test: str, mutation: str, failed: str) -> str:
    return f"| {cell(test)} | {cell(mutation)} | {failed} |"


def run_one(n: int, entry: dict, timeout: float) -> tuple[bool | None, str]:
    """Applies the mutation, runs the test, restores the files. Returns (failed, note); failed
    is None when the mutated code did not compile."""
    edits = edits_of(entry)
    originals: dict[Path, bytes] = {}
    for file, _, _ in edits:
        path = ROOT / file
        if path not in originals:
            originals[path] = path.read_bytes()
    log = OUT / f"{n}.log"
    regressions_before = set(ROOT.glob("crates/*/tests/*.proptest-regressions"))
    try:
        # Apply every edit to the in-memory text of its file, then write each file once.
        texts = {p: b.decode("utf-8") for p, b in originals.items()}
        for file, old, new in edits:
            path = ROOT / file
            if texts[path].count(old) != 1:
                raise RuntimeError(f"`old` does not occur exactly once in {file}")
            texts[path] = texts[path].replace(old, new, 1)
        for path, text in texts.items():
            path.write_bytes(text.encode("utf-8"))
        started = time.monotonic()
        with log.open("wb") as out:
            out.write(f"$ {entry['run']}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                entry["run"],
                shell=True,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True, f"timeout after {timeout:.0f} s"
            except BaseException:
                # Ctrl-C: stop the test's process group before restoring the files.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                raise
        took = time.monotonic() - started
        if code != 0 and b"could not compile" in log.read_bytes():
            # A mutation that does not build proves nothing about the test: a mistake in the
            # spec, reported as such and never counted as caught.
            return None, f"the mutation does not compile (exit {code} after {took:.0f} s)"
        return code != 0, f"exit {code} after {took:.0f} s"
    finally:
        for path, original in originals.items():
            path.write_bytes(original)
        # A property test that fails under the mutation saves its case in a
        # `*.proptest-regressions` file next to the test: a failure of mutated code, not a
        # regression of the real one. Those the run created go.
        for stale in set(ROOT.glob("crates/*/tests/*.proptest-regressions")) - regressions_before:
            stale.unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--check", action="store_true", help="only check the mutations apply (no build)")
    ap.add_argument("--only", metavar="SUBSTR", help="only entries whose `test` contains SUBSTR")
    ap.add_argument("--ids", metavar="LIST", help="only entries by number, e.g. 1-3,7 (as --check --list shows)")
    ap.add_argument("--list", action="store_true", help="list the entries with their numbers")
    ap.add_argument("--out", type=Path, default=None, help="write the table here (default target/prove-tests/table.md)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per test run (default 900)")
    ap.add_argument("--dirty-ok", action="store_true", help="mutate files with uncommitted changes")
    ap.add_argument("--spec", type=Path, default=SPEC, help=argparse.SUPPRESS)
    args = ap.parse_args()

    entries = list(enumerate(load(args.spec), start=1))
    if args.only:
        entries = [(n, e) for n, e in entries if args.only in e.get("test", "")]
        if not entries:
            print(f"no entry's test contains {args.only!r}", file=sys.stderr)
            return 1

    if args.ids:
        wanted: set[int] = set()
        for part in args.ids.split(","):
            lo, _, hi = part.partition("-")
            wanted.update(range(int(lo), int(hi or lo) + 1))
        entries = [(n, e) for n, e in entries if n in wanted]
    if args.list:
        for n, e in entries:
            print(f"{n:3} {e['test']}: {e['breaks']}")
        return 0

    problems = [p for n, e in entries for p in problems_of(n, e)]
    if problems:
        for p in problems:
            print(p)
        print(f"{len(problems)} problem(s) in {args.spec.relative_to(ROOT)}")
        return 1
    if args.check:
        print(f"{len(entries)} mutation(s) checked: every `old` occurs exactly once and differs from `new`")
        return 0

    files = {file for _, e in entries for file, _, _ in edits_of(e)}
    dirty = dirty_files(files)
    if dirty and not args.dirty_ok:
        print("refusing to mutate files with uncommitted changes (pass --dirty-ok to go on):")
        for d in dirty:
            print(f"  {d}")
        return 1

    OUT.mkdir(parents=True, exist_ok=True)
    lines = ["| test | mutation (breaks) | failed |", "|---|---|---|"]
    table = args.out or OUT / "table.md"
    for line in lines:
        print(line, flush=True)
    missed = []
    for n, e in entries:
        mutation = f"{e['file']}: {e['breaks']}"
        failed, note = run_one(n, e, args.timeout)
        verdict = {True: "yes", False: "**no**", None: "**does not compile**"}[failed]
        line = row(e["test"], mutation, verdict)
        lines.append(line)
        print(line, flush=True)
        print(f"  #{n}: {note}; log {(OUT / f'{n}.log').relative_to(ROOT)}", file=sys.stderr, flush=True)
        table.write_text("\n".join(lines) + "\n", encoding="utf-8")
        if failed is not True:
            missed.append(e["test"])
    if missed:
        print(f"\n{len(missed)} mutation(s) not caught:", file=sys.stderr)
        for t in missed:
            print(f"  {t}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
