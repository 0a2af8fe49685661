#!/usr/bin/env bash
# Mutation testing of Meshwork's sans-IO cores with cargo-mutants (issue 20).
#
#   scripts/mutants.sh                 every core, one after another (hours on two cores)
#   scripts/mutants.sh CORE...         only these: proto ledger swarm node tracker
#   scripts/mutants.sh --iterate CORE  re-test only what the last run of CORE missed
#   scripts/mutants.sh --in-diff REV   only the mutants in lines changed since REV (fits CI)
#
# Extra cargo-mutants options come from MUTANTS_ARGS, e.g. MUTANTS_ARGS=--in-place in a
# throwaway worktree on a tmpfs (no copy of the tree per run; about twice as fast here). The
# mold linker is used when it is installed (linking the test binaries is much of a mutant's
# time), and cargo-nextest when it is.
#
# Results land in mutants/<core>/mutants.out (caught.txt, missed.txt, timeout.txt,
# unviable.txt); docs/mutation-testing.md lists the missed mutants that are explained rather
# than caught. The configuration is .cargo/mutants.toml. Each core is tested by its own crate's
# tests: a mutant that only another crate's tests would catch counts as missed, on purpose,
# since the core's rules should be pinned down where they live.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-mutants >/dev/null 2>&1; then
  echo "installing cargo-mutants (once)" >&2
  cargo install cargo-mutants --locked --version 27.1.0
fi

iterate=() in_diff=""
cores=()
while [ $# -gt 0 ]; do
  case "$1" in
    --iterate) iterate=(--iterate) ;;
    --in-diff) in_diff="$2"; shift ;;
    -h|--help) sed -n 2,18p "$0"; exit 0 ;;
    *) cores+=("$1") ;;
  esac
  shift
done
[ ${#cores[@]} -gt 0 ] || cores=(proto ledger swarm node tracker)

# What each core is: the crate whose tests judge it, and the files mutated. `--lib --tests`:
# the unit and integration tests, not the benchmarks (the ledger's is a timing run, not a test)
# nor doctests.
args_of() {
  case "$1" in
    proto) echo "-p meshwork-proto -- --lib --tests" ;;
    ledger) echo "-p meshwork-ledger -- --lib --tests" ;;
    swarm) echo "-p meshwork-swarm -- --lib --tests" ;;
    # The node's and the server's cores are single files in crates with network tests; their
    # unit tests are what pins them down (`--lib`), the rest would add minutes per mutant.
    node) echo "-p meshwork-node --file crates/meshwork-node/src/addrbook.rs --file crates/meshwork-node/src/connmgr.rs --file crates/meshwork-node/src/chainsync.rs -- --lib" ;;
    tracker) echo "-p meshwork-server --file crates/meshwork-server/src/tracker.rs -- --lib" ;;
    *) echo "unknown core '$1' (proto ledger swarm node tracker)" >&2; exit 2 ;;
  esac
}

read -r -a user_args <<<"${MUTANTS_ARGS:-}"
# nextest runs a mutant's test binaries side by side (cargo test runs them one after another).
if command -v cargo-nextest >/dev/null 2>&1; then
  user_args+=(--test-tool=nextest)
fi
if command -v mold >/dev/null 2>&1; then
  export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-fuse-ld=mold"
fi

status=0
for core in "${cores[@]}"; do
  read -r -a a <<<"$(args_of "$core")"
  extra=()
  if [ -n "$in_diff" ]; then
    diff="mutants/$core.diff"
    mkdir -p mutants
    git diff "$in_diff" -- crates > "$diff"
    extra=(--in-diff "$diff")
  fi
  mkdir -p "mutants/$core"
  echo "== cargo mutants: $core"
  # Exit 2 means some mutants were missed, 3 timeouts: report them all, fail at the end.
  cargo mutants --no-shuffle --output "mutants/$core" "${iterate[@]}" "${extra[@]}" "${user_args[@]}" "${a[@]}" || status=$?
  out="mutants/$core/mutants.out"
  for k in caught missed timeout unviable; do
    printf '%s %s: %s\n' "$core" "$k" "$(wc -l < "$out/$k.txt" 2>/dev/null || echo 0)"
  done
done
exit "$status"
