#!/bin/sh
# Prints the path of a working python$1 (e.g. 3.10). pyenv's shims are on PATH in CI but refuse a
# version that is installed and not selected ("pyenv: python3.10: command not found"), so a name on
# PATH is tried by running it, then pyenv's own installs, newest patch release first.
v="$1"
if p=$(command -v "python$v" 2>/dev/null) && "$p" -c '' 2>/dev/null; then echo "$p"; exit 0; fi
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
for p in $(ls -d "$root"/versions/"$v".*/bin/python"$v" 2>/dev/null | sort -V -r); do
  if "$p" -c '' 2>/dev/null; then echo "$p"; exit 0; fi
done
echo "tools/find_python.sh: no working python$v on PATH or under $root/versions; install it or pass its path (make OLDEST_PYTHON=... / GPUHOST_PYTHON=...)" >&2
exit 1
