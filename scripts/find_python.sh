#!/bin/sh
# Prints the path of a working Python interpreter of version $1 (such as 3.13), or nothing.
# pyenv puts a shim on PATH for every version it has, which fails unless that version is
# selected, so a name on PATH is tried rather than trusted, and pyenv's installs are tried too.
v=$1
for p in "python$v" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/"python$v"; do
    "$p" -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$v'; print(sys.executable)" \
        2>/dev/null && exit 0
done
exit 0
