#!/usr/bin/env bash
# A Hydra sweep over the pruning amount from the command line, then its report.
#
# Shows: the `lightning-prune` entry point running the default digits recipe (train with slimming, prune,
# fine-tune, test) once per value of `callbacks.pruning.amount`, each job writing results.json into its
# own folder of the sweep, and `lightning-prune-report` turning the sweep into report.md (a table: accuracy,
# parameters, MACs, latency ratio per job) and report.png (accuracy against MACs).
#
#   bash examples/hydra_sweep.sh                          # into logs/examples/sweep, a few minutes on 2 cores
#   bash examples/hydra_sweep.sh my-sweep                 # into my-sweep/
#   bash examples/hydra_sweep.sh my-sweep debug=smoke     # any further Hydra overrides: here seconds per job
#   bash examples/hydra_sweep.sh my-sweep hydra/launcher=joblib hydra.launcher.n_jobs=2   # jobs side by side
set -euo pipefail

sweep="${1:-logs/examples/sweep}"
shift $(($# > 0 ? 1 : 0))

lightning-prune -m callbacks.pruning.amount=0.3,0.6 "hydra.sweep.dir=$sweep" "$@"
lightning-prune-report "$sweep"
