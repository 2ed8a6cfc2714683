#!/usr/bin/env bash
# Train farmer_jax on a Cloud TPU pod slice (TPU VMs), from your machine:
#
#   TPU_NAME=farmer-1p9b ZONE=us-east5-a WORKDIR=gs://BUCKET/farmer_1p9b_p16 \
#     launch/tpu_pod.sh --config=configs/imagenet256_1p9b.py:16 --spot -- --config.data.data_dir=gs://BUCKET/tfds
#
# What it does, in order:
#   1. creates the TPU VM if `gcloud compute tpus tpu-vm describe` does not find it (a preempted Spot
#      slice is deleted and created again; a stopped one is started);
#   2. ships the code to every worker: your working tree as a tarball (tracked + untracked, not
#      ignored files; uncommitted edits included), or with REPO_URL a clone at GIT_REF;
#   3. installs it on every worker in a Python 3.11 venv: `pip install -e .` plus `jax[tpu]` at the
#      version pinned in setup.py (the TPU VM images ship Python 3.10, below setup.py's >=3.11);
#   4. starts `python -m farmer_jax.main --config=CONFIG --workdir=WORKDIR` on all workers at once
#      (--worker=all), detached; each worker logs to ~/farmer_jax_train.log.
#
# Preemption: rerun the same command. The trainer resumes from the latest checkpoint in WORKDIR
# (and saves one when the VM gets its preemption SIGTERM), so WORKDIR must be on GCS: the workers'
# disks go with the VM. So must the tfds data be (every worker reads its share): pass
# `-- --config.data.data_dir=gs://...`. Large slices may need `gcloud compute tpus queued-resources create` instead
# of step 1; create the slice that way and this script reuses it (same name).
#
# DRY_RUN=1 prints every command (gcloud, and the local tar) instead of running it.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: [VAR=value ...] $(basename "$0") [flags] [-- extra farmer_jax.main flags]

Flags (or the environment variable in brackets):
  --name=NAME          TPU VM name (TPU_NAME), required
  --zone=ZONE          zone, e.g. us-east5-a (ZONE), required
  --workdir=gs://...   checkpoints, logs, eval and samples (WORKDIR), required; must be on GCS
  --type=TYPE          accelerator type (ACCELERATOR_TYPE), default v5p-512
  --runtime=VERSION    TPU VM runtime (RUNTIME_VERSION), default from the type:
                       v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite,
                       v6e v2-alpha-tpuv6e
  --project=PROJECT    GCP project (PROJECT), default gcloud's configured one
  --config=FILE[:ARG]  config (CONFIG), default configs/imagenet256_1p9b.py
  --repo=URL           clone this repository on the workers (REPO_URL); default: copy the local tree
  --ref=REF            with --repo: branch, tag or commit (GIT_REF), default main
  --spot               create the VM as a Spot VM (SPOT=1)
  --preemptible        create the VM as a legacy preemptible VM (PREEMPTIBLE=1)
  --foreground         keep the run attached to this terminal instead of detaching (DETACH=0)
  -h, --help           this message
Environment only: DRY_RUN=1 prints the commands instead of running them.
Everything after -- goes to python -m farmer_jax.main, e.g. -- --config.data.data_dir=gs://B/tfds
Rerunning after a preemption resumes from the latest checkpoint in WORKDIR.
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; echo "Run $(basename "$0") -h for usage." >&2; exit 2; }

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
WORKDIR=${WORKDIR:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-512}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
PROJECT=${PROJECT:-}
CONFIG=${CONFIG:-configs/imagenet256_1p9b.py}
REPO_URL=${REPO_URL:-}
GIT_REF=${GIT_REF:-main}
SPOT=${SPOT:-0}
PREEMPTIBLE=${PREEMPTIBLE:-0}
DETACH=${DETACH:-1}
DRY_RUN=${DRY_RUN:-0}
EXTRA_ARGS=()

while (($#)); do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --name=*) TPU_NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --type=*) ACCELERATOR_TYPE=${1#*=} ;;
    --runtime=*) RUNTIME_VERSION=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --config=*) CONFIG=${1#*=} ;;
    --repo=*) REPO_URL=${1#*=} ;;
    --ref=*) GIT_REF=${1#*=} ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --foreground) DETACH=0 ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
  shift
done

[[ -n $TPU_NAME ]] || die "TPU_NAME (--name) is required"
[[ -n $ZONE ]] || die "ZONE (--zone) is required"
[[ -n $WORKDIR ]] || die "WORKDIR (--workdir) is required"
# Every host writes its checkpoint shards under WORKDIR and a resumed (new) VM must find them.
[[ $WORKDIR == gs://* ]] || die "WORKDIR must be a gs:// path (got '$WORKDIR'): worker disks do not survive a preemption and are not shared"
[[ -f $REPO_ROOT/${CONFIG%%:*} ]] || die "config file '${CONFIG%%:*}' not found under $REPO_ROOT"
((SPOT && PREEMPTIBLE)) && die "--spot and --preemptible exclude each other"

if [[ -z $RUNTIME_VERSION ]]; then
  case $ACCELERATOR_TYPE in
    v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) die "no default runtime for '$ACCELERATOR_TYPE'; set RUNTIME_VERSION (--runtime)" ;;
  esac
fi

# The jax pin of setup.py; jax[tpu] at exactly this version brings the matching libtpu. (Installing
# both in one pip call also makes pip refuse a checkout whose setup.py pins another jax.)
JAX_VERSION=$(sed -n 's/^ *"jax==\([^"]*\)",.*/\1/p' "$REPO_ROOT/setup.py")
[[ -n $JAX_VERSION ]] || die "no \"jax==...\" pin found in $REPO_ROOT/setup.py"

UV_VERSION=0.13.9       # the tool that provides Python 3.11 on the workers
PYTHON_VERSION=3.11     # setup.py's pins were tested on CPython 3.11
# Paths on the workers: the ~ is left for the workers' shells to expand.
# shellcheck disable=SC2088
REMOTE_CODE='~/farmer_jax' REMOTE_VENV='~/farmer_venv' REMOTE_LOG='~/farmer_jax_train.log'
COORDINATOR_PORT=8482   # jax's own default for Cloud TPU

# Shell-quotes one word for display, readably: bare if safe, else in single quotes (only the value
# of a --flag=value word).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then printf '%s' "$1"
  elif [[ $1 =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then printf '%s' "${BASH_REMATCH[1]}"; quote "${BASH_REMATCH[2]}"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# Runs a command, or with DRY_RUN=1 prints it (one line, copy-pasteable).
run() {
  if ((DRY_RUN)); then
    local words=() w
    for w in "$@"; do words+=("$(quote "$w")"); done
    echo "${words[*]}"
  else
    "$@"
  fi
}

note() { echo "# $*" >&2; }

GCLOUD_WHERE=(--zone="$ZONE")
[[ -n $PROJECT ]] && GCLOUD_WHERE+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

# ---- 1. the TPU VM -------------------------------------------------------------------------------
create_vm() {
  local extra=()
  ((SPOT)) && extra+=(--spot)
  ((PREEMPTIBLE)) && extra+=(--preemptible)
  # ${a[@]+"${a[@]}"}: an empty array under `set -u` on bash 3.2 (macOS) too.
  run "${TPU[@]}" create "$TPU_NAME" "${GCLOUD_WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"}
}

if ((DRY_RUN)); then
  run "${TPU[@]}" describe "$TPU_NAME" "${GCLOUD_WHERE[@]}" --format='value(state)'
  note "only if describe finds no VM (a PREEMPTED one is deleted first, a STOPPED one started):"
  create_vm
else
  state=$("${TPU[@]}" describe "$TPU_NAME" "${GCLOUD_WHERE[@]}" --format='value(state)' 2>/dev/null) || state=ABSENT
  note "TPU VM $TPU_NAME: $state"
  case $state in
    READY) ;;
    ABSENT) create_vm ;;
    PREEMPTED|TERMINATED)   # a Spot/preemptible slice cannot be restarted, only recreated
      run "${TPU[@]}" delete "$TPU_NAME" "${GCLOUD_WHERE[@]}" --quiet
      create_vm ;;
    STOPPED) run "${TPU[@]}" start "$TPU_NAME" "${GCLOUD_WHERE[@]}" ;;
    *) echo "tpu_pod.sh: TPU VM $TPU_NAME is $state; wait until it is READY and rerun" >&2; exit 1 ;;
  esac
fi

ssh_all() { run "${TPU[@]}" ssh "$TPU_NAME" "${GCLOUD_WHERE[@]}" --worker=all --command="$1"; }

# ---- 2. the code, on every worker ----------------------------------------------------------------
if [[ -z $REPO_URL ]]; then
  tarball=${TMPDIR:-/tmp}/farmer_jax.$$.tar.gz
  trap 'rm -f "$tarball"' EXIT
  # What you see is what runs: the tracked and the untracked-but-not-ignored files, edits included.
  run bash -c "set -o pipefail; cd $(quote "$REPO_ROOT") && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $(quote "$tarball")"
  run "${TPU[@]}" scp "$tarball" "$TPU_NAME:farmer_jax.tar.gz" "${GCLOUD_WHERE[@]}" --worker=all
  fetch_code="rm -rf $REMOTE_CODE && mkdir -p $REMOTE_CODE && tar -xzf ~/farmer_jax.tar.gz -C $REMOTE_CODE"
else
  ref=$GIT_REF
  if ((!DRY_RUN)) && [[ ! $GIT_REF =~ ^[0-9a-f]{40}$ ]]; then
    # Resolve a branch or tag once, so that every worker checks out the same commit.
    ref=$(git ls-remote "$REPO_URL" "$GIT_REF" | awk 'NR == 1 {print $1}')
    [[ -n $ref ]] || die "GIT_REF '$GIT_REF' not found in $REPO_URL"
    note "$GIT_REF is $ref"
  fi
  fetch_code="rm -rf $REMOTE_CODE && git clone -q $(quote "$REPO_URL") $REMOTE_CODE && git -C $REMOTE_CODE checkout -q $(quote "$ref")"
fi

# ---- 3. the pinned dependencies, on every worker -------------------------------------------------
# A run still going (e.g. after a lost connection) holds the TPU: refuse rather than fight over it.
# Anchored at the venv's python (what step 4 starts), so that pgrep does not match this very (bash)
# command line, which names it too.
guard="if pgrep -f \"^[^ ]*/${REMOTE_VENV#\~/}/bin/python -m farmer_jax[.]main\" >/dev/null; then echo \"\$(hostname): farmer_jax.main is still running\" >&2; exit 1; fi"
install="python3 -m pip install -q --user uv==$UV_VERSION"
install+=" && { [ -x $REMOTE_VENV/bin/python ] || ~/.local/bin/uv venv -q --python $PYTHON_VERSION $REMOTE_VENV; }"
install+=" && cd $REMOTE_CODE && ~/.local/bin/uv pip install -q --python $REMOTE_VENV/bin/python -e . \"jax[tpu]==$JAX_VERSION\""
ssh_all "set -euo pipefail; $guard; $fetch_code && $install"

# ---- 4. the run, on all workers at once ----------------------------------------------------------
# main.py starts jax.distributed when JAX_COORDINATOR_ADDRESS is set; jax then reads this worker's
# index and the worker count from the TPU VM metadata. The coordinator is worker 0.
if ((DRY_RUN)); then
  run "${TPU[@]}" describe "$TPU_NAME" "${GCLOUD_WHERE[@]}" --format='value(networkEndpoints[0].ipAddress)'
  worker0_ip=WORKER0_IP
else
  worker0_ip=$("${TPU[@]}" describe "$TPU_NAME" "${GCLOUD_WHERE[@]}" --format='value(networkEndpoints[0].ipAddress)')
fi

train=(-m farmer_jax.main --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
train_words=("$REMOTE_VENV/bin/python")
for w in "${train[@]}"; do train_words+=("$(quote "$w")"); done
launch="cd $REMOTE_CODE; export JAX_COORDINATOR_ADDRESS=$worker0_ip:$COORDINATOR_PORT"
if ((DETACH)); then
  # Detached, so the run outlives this terminal's SSH connections; a run that dies at once (a bad
  # flag, an import error) shows its log here instead.
  died="{ echo \"\$(hostname): the run exited at once:\" >&2; tail -n 20 $REMOTE_LOG >&2; exit 1; }"
  ssh_all "set -euo pipefail; $guard; $launch; nohup ${train_words[*]} > $REMOTE_LOG 2>&1 < /dev/null & pid=\$!; for _ in \$(seq 15); do sleep 1; kill -0 \$pid 2>/dev/null || $died; done"
  note "started; follow worker 0 with:"
  note "  ${TPU[*]} ssh $TPU_NAME ${GCLOUD_WHERE[*]} --worker=0 --command='tail -f $REMOTE_LOG'"
else
  ssh_all "set -euo pipefail; $guard; $launch; ${train_words[*]} 2>&1 | tee $REMOTE_LOG"
fi
