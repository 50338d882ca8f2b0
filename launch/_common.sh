# Shared by the launch scripts (sourced; not run on its own): errors, option parsing and shell quoting for
# --dry-run output.
# shellcheck shell=bash

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

# Parses "$@" for a script that defines usage() and set_option KEY VALUE (which returns 1 for a key it does not
# know): -h/--help prints usage; --dry-run sets DRY_RUN=1; --key=value and --key value call set_option; the words
# after '--' go to REST; any other word goes to POSITIONAL.
# shellcheck disable=SC2034  # DRY_RUN, REST and POSITIONAL are read by the sourcing script
parse_options() {
  DRY_RUN=0 REST=() POSITIONAL=()
  local arg key value
  while (($#)); do
    arg=$1
    shift
    case $arg in
      -h | --help) usage; exit 0 ;;
      --dry-run | --dry_run) DRY_RUN=1; continue ;;
      --) REST=("$@"); break ;;
      --*=*) key=${arg%%=*} value=${arg#*=} ;;
      --*)
        key=$arg
        (($#)) || die "$key needs a value"
        value=$1
        shift
        ;;
      *) POSITIONAL+=("$arg"); continue ;;
    esac
    set_option "$key" "$value" || die "unknown option $key (see --help)"
  done
}

# For scripts whose command comes after '--': no other bare word is allowed.
no_positional() {
  ((${#POSITIONAL[@]} == 0)) || die "unexpected argument '${POSITIONAL[0]}' (put the command after '--')"
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
