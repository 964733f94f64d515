#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: one process per TPU host, started on every worker at once.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b PROJECT=my-project BUCKET=my-bucket \
#     launch/tpu_pod.sh [--dry_run] [--skip_setup] -- \
#     --gin_file=experiments/movielens_titles_lm.gin --gin.MODEL_DIR=\"/mnt/gcs/runs/titles\"
#
# Steps: copy the committed tree (git HEAD) to every worker, install the project with jax[tpu] and mount
# $BUCKET at /mnt/gcs (all hosts must see one checkpoint directory: Orbax writes each host's
# shards there and process 0 finalizes), then start the train command on all workers.
# JAX finds the other hosts itself (USER_LLM_DISTRIBUTED=auto -> jax.distributed.initialize()
# asks the TPU metadata server). --dry_run (or DRY_RUN=1) prints the commands instead.
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
SKIP_SETUP=0
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry_run) DRY_RUN=1 ;;
    --skip_setup) SKIP_SETUP=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) echo "unknown option $1 (train arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done

TPU_NAME="${TPU_NAME:?set TPU_NAME}"
ZONE="${ZONE:?set ZONE}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null || echo my-project)}"
BUCKET="${BUCKET:-}"
REMOTE_DIR="${REMOTE_DIR:-user_llm}"  # relative to each worker's home directory
JAX_VERSION="${JAX_VERSION:-0.10.2}"
if [[ ${#TRAIN_ARGS[@]} -eq 0 ]]; then
  TRAIN_ARGS=(--gin_file=experiments/movielens_titles_lm.gin
              '--gin.MODEL_DIR="/mnt/gcs/runs/movielens_titles_lm"')
fi
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

q() {  # shell-quotes each argument only where needed (readable, and shlex.split-able)
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$a")
    else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

run() {  # prints the command (dry run) or runs it
  if [[ "$DRY_RUN" == "1" ]]; then q "$@"; else "$@"; fi
}

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --project="$PROJECT" --worker=all)

# Values from the environment reach the remote shell quoted (a space or ";" stays data), and
# the jax version must be a version: the install is pinned (setup.py pins everything else).
if [[ ! "$JAX_VERSION" =~ ^[0-9]+(\.[0-9]+)*$ ]]; then
  echo "JAX_VERSION must look like 0.10.2, got: $JAX_VERSION" >&2; exit 2
fi
RDIR="\$HOME/$(q "$REMOTE_DIR")"
TARBALL="${TMPDIR:-/tmp}/user_llm_src.tar.gz"
SETUP="mkdir -p $RDIR && tar xzf \$HOME/user_llm_src.tar.gz -C $RDIR"
SETUP+=" && cd $RDIR && python3 -m venv .venv && . .venv/bin/activate"
SETUP+=" && pip install -q -e . 'jax[tpu]==$JAX_VERSION'"
SETUP+=" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
if [[ -n "$BUCKET" ]]; then
  SETUP+=" && sudo mkdir -p /mnt/gcs && sudo chown \$USER /mnt/gcs"
  SETUP+=" && (mountpoint -q /mnt/gcs || gcsfuse --implicit-dirs $(q "$BUCKET") /mnt/gcs)"
fi

QUOTED_ARGS="$(q "${TRAIN_ARGS[@]}")"
TRAIN="cd $RDIR && . .venv/bin/activate && USER_LLM_DISTRIBUTED=auto"
TRAIN+=" python -m user_llm.train $QUOTED_ARGS"

if [[ "$SKIP_SETUP" != "1" ]]; then
  # The committed tree (HEAD) only: reproducible, and no local venv or data copied along.
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$TARBALL" HEAD
  run "${GCLOUD[@]}" scp "$TARBALL" "$TPU_NAME:user_llm_src.tar.gz" "${WHERE[@]}"
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command="$SETUP"
fi
run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command="$TRAIN"
