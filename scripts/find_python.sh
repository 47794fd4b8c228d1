#!/usr/bin/env bash
# Usage: scripts/find_python.sh 3.12
# Prints the real path of a Python X.Y interpreter that can create virtual environments, or
# prints why not to stderr and exits 1. Tries, in order: `pythonX.Y` on PATH, then pyenv's
# installs ($PYENV_ROOT or ~/.pyenv, then /root/.pyenv). Each candidate is run, not just
# found: a pyenv shim is on PATH for every installed version but fails ("command not found")
# unless that version is selected, so a candidate counts only if it starts, has the right
# version and has the venv and ensurepip modules. The printed path is sys.executable, so a
# working shim resolves to the interpreter behind it.
set -u
want="${1:?usage: $0 X.Y}"
probe="import sys, venv, ensurepip; assert '%d.%d' % sys.version_info[:2] == '$want'; print(sys.executable)"
shopt -s nullglob
candidates=("python$want")
for root in "${PYENV_ROOT:-$HOME/.pyenv}" /root/.pyenv; do
  found=("$root"/versions/"$want"*/bin/python"$want")
  [ "${#found[@]}" -gt 0 ] || continue
  # Newest patch release first (3.12.10 before 3.12.9).
  while IFS= read -r p; do candidates+=("$p"); done < <(printf '%s\n' "${found[@]}" | sort -rV)
done
for c in "${candidates[@]}"; do
  if exe=$("$c" -c "$probe" 2>/dev/null) && [ -n "$exe" ]; then
    echo "$exe"
    exit 0
  fi
done
echo "find_python.sh: no usable Python $want (tried: ${candidates[*]})" >&2
exit 1
