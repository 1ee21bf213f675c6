#!/usr/bin/env bash
# Serve the latest iteration of a Megatron run (the one latest_checkpointed_iteration.txt
# names), with SGLang's usual server. Extra options are passed through to SGLang.
#
#   examples/serve_latest.sh /ckpts/my_run --tokenizer-path /models/tok --tp-size 2
#   LAUNCHER="sglang serve" examples/serve_latest.sh /ckpts/my_run ...
#
# The model dimensions come from the checkpoint; a tokenizer/ folder saved with the
# checkpoint is used when --tokenizer-path is not given.
set -euo pipefail
run_root=${1:?usage: serve_latest.sh RUN_ROOT [sglang options...]}
shift
echo "serving iteration $(cat "$run_root/latest_checkpointed_iteration.txt") of $run_root" >&2
# shellcheck disable=SC2086  # LAUNCHER is deliberately split into words
exec ${LAUNCHER:-python -m sglang.launch_server} --model-path "$run_root" \
    --load-format megatron "$@"
