#!/usr/bin/env bash
# megatron-ext multi-node torchrun over a hostfile (one host per line), started through ssh
# (or pdsh with LAUNCHER=pdsh), rendered by `python -m launch render --template hostfile`.
set -euo pipefail
HOSTFILE=$${HOSTFILE:-hostfile}
CONFIG=${config_q}
REPO=${repo_q}
PYTHON=${python_q}
NPROC_PER_NODE=${nproc_per_node}
NODES=${nodes}
JOB_NAME=${job_name_q}
EXTRA_ARGS=(${extra_args})
mapfile -t hosts < <(grep -v '^\s*#' "$$HOSTFILE" | awk 'NF {print $$1}')
if [ "$${#hosts[@]}" -lt "$$NODES" ]; then
  echo "$$HOSTFILE lists $${#hosts[@]} hosts, the job needs $$NODES" >&2; exit 2
fi
head=$${hosts[0]}; port=$${MASTER_PORT:-29500}
quoted_args=$$(printf ' %q' "$${EXTRA_ARGS[@]}")
cmd="cd $$(printf %q "$$REPO") && PYTHONFAULTHANDLER=1 ${nccl_prefix}$$(printf %q "$$PYTHON") -m torch.distributed.run --nnodes $$NODES \
--nproc-per-node $$NPROC_PER_NODE --rdzv-id $$(printf %q "$$JOB_NAME") --rdzv-backend c10d --rdzv-endpoint $$head:$$port \
-m megatron_ext.train --config $$(printf %q "$$CONFIG")$$quoted_args"
if [ "$${LAUNCHER:-ssh}" = pdsh ]; then
  exec pdsh -w "$$(IFS=,; echo "$${hosts[*]:0:$$NODES}")" "$$cmd"
fi
pids=()
for host in "$${hosts[@]:0:$$NODES}"; do ssh "$$host" "$$cmd" & pids+=($$!); done
status=0
for pid in "$${pids[@]}"; do wait "$$pid" || status=$$?; done
exit "$$status"
