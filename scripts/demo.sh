#!/usr/bin/env bash
# The demo: preview every example plan with `concord check`, print each report,
# and end with a summary. Exits non-zero if any verdict differs from the one
# config/examples/examples.toml expects.
set -uo pipefail
concord=${1:-target/debug/concord}
dir=config/examples
world=$dir/world.toml
summary=()
failed=0
# Read the manifest: one example per [[example]] table.
mapfile -t rows < <(python3 - "$dir/examples.toml" <<'PY'
import sys, tomllib
for e in tomllib.load(open(sys.argv[1], "rb"))["example"]:
    print("\t".join([e["plan"], e["agent"], e["expect"], e.get("previous", "-"), e["story"]]))
PY
)
for row in "${rows[@]}"; do
  IFS=$'\t' read -r plan agent expect previous story <<<"$row"
  args=(check "$dir/$plan" --agent "$agent" --world "$world" --policy config/policy.toml)
  [ "$previous" != "-" ] && args+=(--previous "$dir/$previous")
  echo "================================================================================"
  echo "$story"
  echo "\$ concord ${args[*]}"
  echo
  "$concord" "${args[@]}"
  code=$?
  case $code in 0) got=admit ;; 2) got=needs_approval ;; 3) got=reject ;; *) got="error($code)" ;; esac
  mark=ok
  if [ "$got" != "$expect" ]; then mark="UNEXPECTED (expected $expect)"; failed=1; fi
  summary+=("$(printf '%-28s %-9s %-15s %s' "$plan" "$agent" "$got" "$mark")")
done
echo "================================================================================"
echo "summary"
printf '%-28s %-9s %-15s %s\n' plan agent verdict check
printf '%s\n' "${summary[@]}"
exit $failed
