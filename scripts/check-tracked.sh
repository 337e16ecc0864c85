#!/usr/bin/env bash
# Fails when the repository tracks what must never be shared: a data directory, a token file
# or a store file (every clone would start on that state and share that admin token).
set -euo pipefail
cd "$(dirname "$0")/.."
bad=$(git ls-files | grep -E '(^|/)\.flotilla/|(^|/)[^/]*\.token$|\.redb$|(^|/)context\.json$' || true)
if [ -n "$bad" ]; then
  echo "error: these files must not be tracked (data directories, tokens, stores):" >&2
  echo "$bad" | sed 's/^/  /' >&2
  echo "remove them with: git rm -r --cached <path>" >&2
  exit 1
fi
echo "tracked files: no data directory, token or store"
