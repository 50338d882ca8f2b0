# Shared by the launch scripts (sourced; not run on its own): errors and shell quoting for --dry-run output.
# shellcheck shell=bash

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

# One word, quoted for a POSIX shell only when it needs it.
quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Words quoted for a shell; --flag=VALUE / VAR=VALUE keep the name bare and quote only VALUE.
quote_all() {
  local out="" w
  for w in "$@"; do
    if [[ $w =~ ^(--?[A-Za-z0-9_.-]+=|[A-Za-z_][A-Za-z0-9_]*=)(.*)$ ]]; then
      w="${BASH_REMATCH[1]}$(quote "${BASH_REMATCH[2]}")"
    else
      w=$(quote "$w")
    fi
    out+="${out:+ }$w"
  done
  printf '%s' "$out"
}
