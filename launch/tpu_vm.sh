#!/usr/bin/env bash
# Train jaxlm on a Cloud TPU VM slice (a v5e-16 by default): create or reuse the slice, ship the code to
# every worker, install jaxlm[tpu] there, and run the same `python -m jaxlm.train` on all workers at once.
# Run `launch/tpu_vm.sh --help` for the options; launch/README.md has the walk-through.
set -euo pipefail

readonly PROG=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT
readonly PLACEHOLDER_BUCKET=YOUR_BUCKET
# Paths on the workers: $HOME is expanded there, not here.
# shellcheck disable=SC2016
readonly REMOTE_DIR='$HOME/jaxlm' REMOTE_VENV='$HOME/jaxlm-venv' REMOTE_LOG='$HOME/jaxlm-train.log'
readonly WORKER_NUMBER_URL=http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number

usage() {
  cat <<EOF
usage: $PROG [options] [--config.FIELD=VALUE ...]

Create (or reuse) a Cloud TPU VM slice, copy this checkout to every worker, install jaxlm[tpu] on every
worker and run on all of them at once:
    python -m jaxlm.train --config CONFIG --workdir gs://BUCKET/... [--config.FIELD=VALUE ...]
JAX finds the other workers by itself on a TPU VM slice. Worker 0's output is streamed here; every
worker also appends its output to ~/jaxlm-train.log on that worker.

Rerunning the same command resumes from the workdir's latest checkpoint. A spot slice that was preempted
is deleted and created again first, so after a preemption just run the same command again (or pass
--restarts N to do that automatically).

options (environment variable in brackets):
  --name NAME              TPU VM name [TPU_NAME] (default: jaxlm-ACCELERATOR_TYPE)
  --zone ZONE              [ZONE] (default: us-west4-a, a zone with v5e)
  --project PROJECT        [PROJECT] (default: gcloud's configured project)
  --accelerator-type TYPE  [ACCELERATOR_TYPE] (default: v5litepod-16, a v5e-16: 4 hosts x 4 chips)
  --version VERSION        TPU VM runtime image [TPU_VERSION] (default: matches the type:
                           v5litepod -> v2-alpha-tpuv5-lite, v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e,
                           v2/v3/v4 -> tpu-ubuntu2204-base)
  --spot                   create a spot slice [SPOT=1]
  --config CONFIG          config file[:variant] inside the checkout (default: configs/yinggem.py:tiny, with
                           train.batch_size 12 and eval_batch_size 96 rounded up to a multiple of the
                           slice's devices: 16 and 96 on a v5e-16). The devices must divide the batch sizes.
  --workdir gs://B/PATH    run directory on Cloud Storage [WORKDIR]
                           (default: gs://\$BUCKET/jaxlm/CONFIGNAME-VARIANT)
  --bucket BUCKET          [BUCKET] bucket of the default workdir
  --repo URL               install from this git repository on the workers instead of copying the local
                           checkout (git clone URL; --ref picks a branch or tag)
  --ref REF                commit, branch or tag to ship (default: HEAD of the local checkout; uncommitted
                           changes are not shipped)
  --python VERSION         Python of the workers' virtual environment, made with uv [PYTHON_VERSION]
                           (default: 3.11)
  --detach                 start training in the background on every worker and return; follow it with
                           gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=0 --command 'tail -f ~/jaxlm-train.log'
  --restarts N             after a preemption, recreate the slice and resume up to N times (default: 0)
  --skip-setup             do not copy the code or install anything when the slice already exists (the
                           workers have this code from an earlier run)
  --delete-after           delete the slice when training returns (whatever its exit status)
  --delete                 only delete the slice, then exit
  --dry-run                print every command (lines starting with '+ '), run nothing, never call gcloud
  -h, --help               show this help
  --config.FIELD=VALUE     passed to jaxlm.train unchanged (e.g. --config.train.steps=5000)

examples:
  $PROG --dry-run
  BUCKET=my-bucket $PROG --spot --config.train.steps=5000
  $PROG --accelerator-type v4-16 --zone us-central2-b --config configs/hrom.py:tiny --workdir gs://b/hrom
  $PROG --delete
EOF
}

die() { echo "$PROG: $*" >&2; exit 2; }

# Shell-quote one word the way Python's shlex.quote does (so the printed commands can be parsed back).
quote() {
  local s=$1
  if [[ -n $s && $s != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\"\'\"\'}"
  fi
}

quote_all() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(quote "$a")"; done
  printf '%s' "$out"
}

# Print a command as '+ cmd ...' (stdout in --dry-run, stderr otherwise) and run it unless --dry-run.
run() {
  if ((DRY_RUN)); then
    echo "+ $(quote_all "$@")"
    return 0
  fi
  echo "+ $(quote_all "$@")" >&2
  "$@"
}

note() {
  if ((DRY_RUN)); then echo "# $*"; else echo "# $*" >&2; fi
}

# ------------------------------------------------------------------------------------------- options
NAME=${TPU_NAME:-}
ZONE=${ZONE:-us-west4-a}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-16}
VERSION=${TPU_VERSION:-}
SPOT=${SPOT:-0}
CONFIG=configs/yinggem.py:tiny
CONFIG_GIVEN=0
WORKDIR=${WORKDIR:-}
BUCKET=${BUCKET:-}
REPO_URL=""
REF=""
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
DETACH=0
RESTARTS=0
SKIP_SETUP=0
DELETE_AFTER=0
DELETE_ONLY=0
DRY_RUN=0
OVERRIDES=()

need_value() { (($1 >= 2)) || die "option $2 needs a value (see --help)"; }

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --detach) DETACH=1 ;;
    --skip-setup) SKIP_SETUP=1 ;;
    --delete-after) DELETE_AFTER=1 ;;
    --delete) DELETE_ONLY=1 ;;
    --config.*=*) OVERRIDES+=("$1") ;;
    --config.*) need_value $# "$1"; OVERRIDES+=("$1=$2"); shift ;;
    --name=* | --zone=* | --project=* | --accelerator-type=* | --version=* | --config=* | --workdir=* | \
      --bucket=* | --repo=* | --ref=* | --python=* | --restarts=*)
      opt=${1%%=*}; set -- "$opt" "${1#*=}" "${@:2}"; continue ;;
    --name) need_value $# "$1"; NAME=$2; shift ;;
    --zone) need_value $# "$1"; ZONE=$2; shift ;;
    --project) need_value $# "$1"; PROJECT=$2; shift ;;
    --accelerator-type) need_value $# "$1"; ACCELERATOR_TYPE=$2; shift ;;
    --version) need_value $# "$1"; VERSION=$2; shift ;;
    --config) need_value $# "$1"; CONFIG=$2; CONFIG_GIVEN=1; shift ;;
    --workdir) need_value $# "$1"; WORKDIR=$2; shift ;;
    --bucket) need_value $# "$1"; BUCKET=$2; shift ;;
    --repo) need_value $# "$1"; REPO_URL=$2; shift ;;
    --ref) need_value $# "$1"; REF=$2; shift ;;
    --python) need_value $# "$1"; PYTHON_VERSION=$2; shift ;;
    --restarts) need_value $# "$1"; RESTARTS=$2; shift ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) die "unexpected argument '$1' (see --help)" ;;
  esac
  shift
done

[[ $RESTARTS =~ ^[0-9]+$ ]] || die "--restarts needs a whole number, got '$RESTARTS'"
[[ $SPOT == 0 || $SPOT == 1 ]] || die "SPOT must be 0 or 1, got '$SPOT'"
((DETACH && DELETE_AFTER)) && die "--detach and --delete-after do not go together (the slice would go while training)"
NAME=${NAME:-jaxlm-$ACCELERATOR_TYPE}

if [[ -z $VERSION ]]; then
  case $ACCELERATOR_TYPE in
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) VERSION=tpu-ubuntu2204-base ;;
    *) die "no default runtime image for accelerator type '$ACCELERATOR_TYPE'; pass --version" ;;
  esac
fi

# The default run: the tiny recipe's batch sizes (12, eval 96) rounded up to a multiple of the slice's
# device count, which must divide them. With your own --config, choose batch sizes it divides.
if ((!CONFIG_GIVEN)); then
  case $ACCELERATOR_TYPE in
    v4-* | v5p-*) devices=$((${ACCELERATOR_TYPE##*-} / 2)) ;;    # the type counts TensorCores, 2 per device
    *) devices=${ACCELERATOR_TYPE##*-} ;;                          # v5e, v6e: chips; v2, v3: TensorCores
  esac
  if [[ $devices =~ ^[0-9]+$ ]] && ((devices > 0)); then
    for field_default in batch_size:12 eval_batch_size:96; do
      field=${field_default%%:*} want=${field_default#*:}
      if [[ " ${OVERRIDES[*]-} " != *" --config.train.$field="* ]]; then
        OVERRIDES+=("--config.train.$field=$(((want + devices - 1) / devices * devices))")
      fi
    done
  fi
fi

if [[ -z $WORKDIR ]]; then
  config_file=${CONFIG%%:*}
  run_name=$(basename "$config_file" .py)
  [[ $CONFIG == *:* && -n ${CONFIG#*:} ]] && run_name+="-${CONFIG#*:}"
  WORKDIR="gs://${BUCKET:-$PLACEHOLDER_BUCKET}/jaxlm/$run_name"
fi
if ((!DRY_RUN && !DELETE_ONLY)) && [[ $WORKDIR == "gs://$PLACEHOLDER_BUCKET/"* ]]; then
  die "set BUCKET=your-bucket (or --workdir gs://your-bucket/path): every worker writes its checkpoint shards there"
fi
if [[ $WORKDIR != gs://* ]]; then
  echo "$PROG: warning: --workdir $WORKDIR is not on Cloud Storage; on a multi-host slice each worker would" \
    "write its own part of every checkpoint to its own disk" >&2
fi

GCLOUD_FLAGS=("--zone=$ZONE")
[[ -n $PROJECT ]] && GCLOUD_FLAGS+=("--project=$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

# ------------------------------------------------------------------------------------------- steps
tpu_state() {  # prints the slice's state (READY, PREEMPTED, ...), nothing when it does not exist
  "${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" --format='value(state)' 2>/dev/null || true
}

create_args() {
  CREATE=("${TPU[@]}" create "$NAME" "${GCLOUD_FLAGS[@]}" "--accelerator-type=$ACCELERATOR_TYPE"
    "--version=$VERSION")
  ((SPOT)) && CREATE+=(--spot)
  return 0
}

ensure_slice() {  # sets CREATED=1 when it (re)creates the slice
  CREATED=1
  create_args
  if ((DRY_RUN)); then
    run "${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" '--format=value(state)'
    note "create the slice when the describe above finds none (a preempted one is deleted first)"
    run "${CREATE[@]}"
    return 0
  fi
  local state
  state=$(tpu_state)
  case $state in
    "") note "no TPU VM $NAME in $ZONE yet: creating it" ;;
    READY) note "reusing TPU VM $NAME (READY)"; CREATED=0; return 0 ;;
    PREEMPTED | TERMINATED | STOPPED)
      note "TPU VM $NAME is $state: deleting and creating it again"
      run "${TPU[@]}" delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet ;;
    *) echo "$PROG: TPU VM $NAME is in state $state; wait for READY (or --delete it) and rerun" >&2; exit 1 ;;
  esac
  run "${CREATE[@]}"
}

setup_workers() {
  local fetch install
  if [[ -n $REPO_URL ]]; then
    fetch="rm -rf $REMOTE_DIR && git clone --depth=1 ${REF:+--branch $(quote "$REF") }$(quote "$REPO_URL") $REMOTE_DIR"
  else
    local archive=${TMPDIR:-/tmp}/$NAME-code.tar.gz
    if ((!DRY_RUN)) && [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
      echo "$PROG: warning: uncommitted changes in $REPO_ROOT are not shipped (only ${REF:-HEAD})" >&2
    fi
    run git -C "$REPO_ROOT" archive --format=tar.gz -o "$archive" "${REF:-HEAD}"
    run "${TPU[@]}" scp "$archive" "$NAME:jaxlm.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
    ((DRY_RUN)) || rm -f "$archive"
    fetch="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf \$HOME/jaxlm.tar.gz -C $REMOTE_DIR"
  fi
  # uv brings its own Python when the image's is older than the one asked for.
  install="set -euo pipefail; $fetch; export PATH=\$HOME/.local/bin:\$PATH;"
  install+=" command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh;"
  install+=" [ -x $REMOTE_VENV/bin/python ] || uv venv --python $(quote "$PYTHON_VERSION") $REMOTE_VENV;"
  install+=" uv pip install --python $REMOTE_VENV/bin/python -e \"${REMOTE_DIR}[tpu]\""
  run "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command "$install"
}

train_on_workers() {
  local train remote
  train="python -m jaxlm.train $(quote_all --config "$CONFIG" --workdir "$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"})"
  remote="set -o pipefail; cd $REMOTE_DIR && source $REMOTE_VENV/bin/activate &&"
  if ((DETACH)); then
    remote+=" nohup $train >> $REMOTE_LOG 2>&1 < /dev/null &"
  else
    # Worker 0 streams to this terminal; the others only to their log file.
    remote+=" w=\$(curl -sf -H Metadata-Flavor:Google $WORKER_NUMBER_URL || echo 0);"
    remote+=" $train 2>&1 | if [ \"\$w\" = 0 ]; then tee -a $REMOTE_LOG; else cat >> $REMOTE_LOG; fi"
  fi
  run "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command "$remote"
}

delete_slice() {
  run "${TPU[@]}" delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
}

# ------------------------------------------------------------------------------------------- main
if ((DELETE_ONLY)); then
  delete_slice
  exit 0
fi

kind=$ACCELERATOR_TYPE
((SPOT)) && kind+=" (spot)"
note "TPU VM $NAME: $kind, runtime $VERSION, zone $ZONE"
note "workdir $WORKDIR (rerun the same command to resume)"
attempt=0
while :; do
  ensure_slice
  if ((SKIP_SETUP && DRY_RUN)); then
    note "--skip-setup: the next steps run only when the slice is created"
  fi
  if ((!SKIP_SETUP || CREATED)); then setup_workers; fi
  status=0
  train_on_workers || status=$?
  if ((status != 0 && !DRY_RUN && attempt < RESTARTS)); then
    state=$(tpu_state)
    if [[ $state == PREEMPTED || $state == TERMINATED || -z $state ]]; then
      attempt=$((attempt + 1))
      note "slice $NAME is ${state:-gone} (exit status $status): restart $attempt of $RESTARTS, resuming from $WORKDIR"
      continue
    fi
  fi
  break
done
if ((DETACH && !DRY_RUN)); then
  note "training runs in the background; follow worker 0 with:"
  note "  $(quote_all "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=0 --command "tail -f ~/jaxlm-train.log")"
fi
if ((DELETE_AFTER)); then
  delete_slice
fi
exit "$status"
