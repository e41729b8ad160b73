# shellcheck shell=bash
# Shared helpers for pgfanout's scripts (scripts/services, scripts/test,
# scripts/demo, .ci/run). Source it; it defines functions and a few variables
# and has no side effects beyond that:
#
#   PGFANOUT_ROOT       the repository root
#   PGFANOUT_CACHE      ${PGFANOUT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgfanout}
#   PGFANOUT_RUN_DIR    ${PGFANOUT_RUN_DIR:-/tmp/pgfanout-run}
#
#   log / warn / die MSG…          messages on stderr
#   as_root CMD…                   CMD as root (sudo only when not root)
#   pg_user                        user that runs PostgreSQL (postgres when root)
#   ensure_pg_user                 create that user if it is missing
#   run_as_pg_user CMD…            CMD as that user
#   free_ports N                   N distinct free TCP ports on 127.0.0.1
#   wait_for_port PORT SECS [PID]  until 127.0.0.1:PORT accepts (fails if PID dies)
#   wait_for_http URL SECS [PID]   until URL answers 2xx
#   pid_start_time PID             process start time (guards against PID reuse)
#   pid_running PID                PID is a live process (not a zombie)
#   with_services CMD…             services up, source env, CMD, services down
#   apt_install PKG…               install missing Debian packages
#   ensure_rust                    cargo on PATH (installs what it can)

if [[ -n "${_PGFANOUT_COMMON_SH:-}" ]]; then
  return 0
fi
_PGFANOUT_COMMON_SH=1

PGFANOUT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
PGFANOUT_CACHE="${PGFANOUT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgfanout}"
PGFANOUT_RUN_DIR="${PGFANOUT_RUN_DIR:-/tmp/pgfanout-run}"
export PGFANOUT_ROOT PGFANOUT_CACHE PGFANOUT_RUN_DIR

# ---------------------------------------------------------------- logging ---

_pgf_prog="$(basename "${0:-pgfanout}")"

log() { printf '[%s] %s\n' "$_pgf_prog" "$*" >&2; }
warn() { printf '[%s] WARNING: %s\n' "$_pgf_prog" "$*" >&2; }
die() {
  printf '[%s] ERROR: %s\n' "$_pgf_prog" "$*" >&2
  exit 1
}

# Seconds since the epoch with milliseconds, for timings in logs.
now_ms() { date +%s%3N; }

# ------------------------------------------------------------- privileges ---

is_root() { [[ "$(id -u)" -eq 0 ]]; }

# as_root CMD…: run CMD as root; through sudo when we are not root.
as_root() {
  if is_root; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root for: $* (not root, and sudo is not installed)"
  fi
}

# The user PostgreSQL runs as. PostgreSQL refuses to run as root, so as root
# that is the unprivileged `postgres` user; as any other user it is that user
# itself (no sudo needed, and it can read its own cache). PGFANOUT_PG_USER
# overrides.
pg_user() {
  if [[ -n "${PGFANOUT_PG_USER:-}" ]]; then
    printf '%s\n' "$PGFANOUT_PG_USER"
  elif is_root; then
    printf 'postgres\n'
  else
    id -un
  fi
}

ensure_pg_user() {
  local u
  u="$(pg_user)"
  if ! id -u "$u" >/dev/null 2>&1; then
    log "creating system user $u"
    as_root useradd --system --user-group --home-dir /var/lib/postgresql \
      --no-create-home --shell /bin/bash "$u"
  fi
  [[ "$(id -u "$u")" -ne 0 ]] || die "PostgreSQL cannot run as root (PGFANOUT_PG_USER=$u)"
}

# run_as_pg_user CMD…: run CMD as pg_user, from a directory it can enter.
run_as_pg_user() {
  local u
  u="$(pg_user)"
  if [[ "$u" == "$(id -un)" ]]; then
    "$@"
  elif is_root; then
    (cd / && runuser -u "$u" -- "$@")
  else
    (cd / && sudo -u "$u" -- "$@")
  fi
}

# ------------------------------------------------------------------- apt ---

# deb_missing PKG…: print the PKGs that are not installed.
deb_missing() {
  local installed
  installed="$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "$@" 2>/dev/null |
    awk '$2 == "installed" { print $1 }')" || true
  local p
  for p in "$@"; do
    grep -qxF "$p" <<<"$installed" || printf '%s\n' "$p"
  done
}

_PGF_APT_UPDATED=""
# apt_install PKG…: install the PKGs that are missing (apt-get update once,
# only when something is missing; no recommends: docker-compose's would pull
# in the whole Docker engine).
apt_install() {
  local missing=()
  mapfile -t missing < <(deb_missing "$@")
  ((${#missing[@]})) || return 0
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get"
  if [[ -z "$_PGF_APT_UPDATED" ]]; then
    log "apt-get update"
    as_root apt-get update -qq
    _PGF_APT_UPDATED=1
  fi
  log "apt-get install ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends -o Dpkg::Options::=--force-confdef \
    -o Dpkg::Options::=--force-confold "${missing[@]}" >&2
}

# ------------------------------------------------------------------ ports ---

# free_ports N: print N distinct TCP ports that are free on 127.0.0.1, one a
# line. Picked at random below the kernel's ephemeral range (32768+), so that
# outgoing connections do not grab them between now and the server's bind.
free_ports() {
  local n="$1" py="$PGFANOUT_CACHE/venv/bin/python"
  # The venv's python: pyenv's python3 shim alone costs ~0.25 s here.
  [[ -x "$py" ]] || py="$(command -v python3 || true)"
  if [[ -n "$py" ]]; then
    "$py" - "$n" <<'PY'
import random, socket, sys
n = int(sys.argv[1]); seen = set(); out = []
rng = random.SystemRandom()
while len(out) < n:
    p = rng.randint(20000, 32000)
    if p in seen:
        continue
    seen.add(p)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    out.append(p)
print("\n".join(map(str, out)))
PY
  else
    # Without python: a port nobody answers on is taken as free.
    local -A seen=()
    local p count=0
    while ((count < n)); do
      p=$((20000 + RANDOM % 12000))
      [[ -z "${seen[$p]:-}" ]] || continue
      seen[$p]=1
      if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        echo "$p"
        count=$((count + 1))
      fi
    done
  fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for_port PORT SECS [PID]
wait_for_port() {
  local port="$1" secs="$2" pid="${3:-}" deadline
  deadline=$(($(date +%s) + secs))
  until port_open "$port"; do
    if [[ -n "$pid" ]] && ! pid_running "$pid"; then
      return 1
    fi
    (($(date +%s) < deadline)) || return 1
    sleep 0.05
  done
}

# wait_for_http URL SECS [PID]
wait_for_http() {
  local url="$1" secs="$2" pid="${3:-}" deadline
  deadline=$(($(date +%s) + secs))
  until curl -fsS --max-time 2 -o /dev/null "$url" 2>/dev/null; do
    if [[ -n "$pid" ]] && ! pid_running "$pid"; then
      return 1
    fi
    (($(date +%s) < deadline)) || return 1
    sleep 0.1
  done
}

# pid_start_time PID: field 22 of /proc/PID/stat; empty if there is no such
# process or it is a zombie (this machine's init reaps orphans only every
# second or two, so an exited daemon lingers as a zombie for that long).
pid_start_time() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  stat="${stat##*) }" # drop "pid (comm) ", comm may hold spaces
  # shellcheck disable=SC2086
  set -- $stat
  [[ "$1" != Z && "$1" != X ]] || return 0
  printf '%s\n' "${20}"
}

# pid_running PID: PID exists and is not a zombie.
pid_running() { [[ -n "$(pid_start_time "$1")" ]]; }

# ---------------------------------------------------------- with_services ---

_pgf_with_services_down() {
  trap - EXIT INT TERM
  "$PGFANOUT_ROOT/scripts/services" down >&2 || warn "scripts/services down failed"
}

# with_services CMD…: start every service (scripts/services up), source the
# env it writes, run CMD, and always stop the services again (also on EXIT,
# INT and TERM). Returns CMD's exit code. Progress goes to stderr.
with_services() {
  local rc=0
  "$PGFANOUT_ROOT/scripts/services" up >/dev/null || return $?
  trap '_pgf_with_services_down' EXIT
  trap '_pgf_with_services_down; exit 130' INT
  trap '_pgf_with_services_down; exit 143' TERM
  # shellcheck source=/dev/null
  source "$PGFANOUT_RUN_DIR/env"
  "$@" || rc=$?
  _pgf_with_services_down
  return "$rc"
}

# ------------------------------------------------------------------ rust ---

# ensure_rust: make cargo available on PATH. rustup's toolchain (~/.cargo/bin)
# when present; otherwise Debian's packages. Debian 12 has no `rustup`
# package, and rustup could not download a toolchain here anyway; its `cargo`
# and `rustc` (1.63) are older than our rust-version, so that is a last
# resort that fails loudly.
ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    if apt-cache show rustup >/dev/null 2>&1; then
      log "installing Debian's rustup"
      apt_install rustup
      rustup toolchain install stable --profile minimal
      export PATH="$HOME/.cargo/bin:$PATH"
    else
      warn "no cargo and no rustup package: installing Debian's cargo/rustc"
      apt_install cargo rustc
    fi
  fi
  command -v cargo >/dev/null 2>&1 || die "cargo is not available"
  local want have
  want="$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$PGFANOUT_ROOT/Cargo.toml" 2>/dev/null | head -n1)"
  have="$(rustc --version 2>/dev/null | awk '{print $2}')"
  if [[ -n "$want" && -n "$have" ]] &&
    [[ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -n1)" != "$want" ]]; then
    die "rustc $have is older than the project's rust-version $want"
  fi
}
