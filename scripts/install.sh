#!/usr/bin/env bash
# Install mvsnap under PREFIX (default /usr/local): the binary (cargo install), a man page per
# command and the bash, zsh and fish completions, all generated from the binary's own
# command-line definition (`mvsnap generate man|completions`).
#
#   scripts/install.sh [PREFIX]        # or PREFIX=... scripts/install.sh
#
#   PREFIX/bin/mvsnap
#   PREFIX/share/man/man1/mvsnap.1, mvsnap-snapshot-list.1, ...
#   PREFIX/share/bash-completion/completions/mvsnap
#   PREFIX/share/zsh/site-functions/_mvsnap
#   PREFIX/share/fish/vendor_completions.d/mvsnap.fish
set -euo pipefail

cd "$(dirname "$0")/.."
PREFIX=${1:-${PREFIX:-/usr/local}}

cargo install --locked --path crates/mvsnap-cli --root "$PREFIX"
BIN=$PREFIX/bin/mvsnap

MAN=$PREFIX/share/man/man1
BASH_DIR=$PREFIX/share/bash-completion/completions
ZSH_DIR=$PREFIX/share/zsh/site-functions
FISH_DIR=$PREFIX/share/fish/vendor_completions.d
install -d "$MAN" "$BASH_DIR" "$ZSH_DIR" "$FISH_DIR"
"$BIN" generate man "$MAN" >/dev/null
"$BIN" generate completions bash >"$BASH_DIR/mvsnap"
"$BIN" generate completions zsh >"$ZSH_DIR/_mvsnap"
"$BIN" generate completions fish >"$FISH_DIR/mvsnap.fish"

echo "installed $BIN"
echo "  man pages:   $MAN/mvsnap*.1 (man mvsnap, man mvsnap-snapshot-list)"
echo "  completions: $BASH_DIR/mvsnap, $ZSH_DIR/_mvsnap, $FISH_DIR/mvsnap.fish"
case ":$PATH:" in
*":$PREFIX/bin:"*) ;;
*) echo "note: $PREFIX/bin is not on PATH: export PATH=\"$PREFIX/bin:\$PATH\"" ;;
esac
