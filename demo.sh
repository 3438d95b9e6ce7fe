#!/usr/bin/env bash
# The whole pipeline, end to end, in minutes on a CPU (times: docs/get_data.md): a synthetic
# MTAT-shaped data set -> log-mel spectrograms -> the multi-scale CNN, through the same
# three scripts as the real run. Settings differ from the paper's only in size and
# schedule (256 clips, random split, 6 epochs, batch 8, batch-norm momentum 0.1).
#
#   bash demo.sh                  # writes data/demo/ and experiments/demo-<date>/
#   DATA=/tmp/demo bash demo.sh   # elsewhere
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data/demo}
OUT=${OUT:-experiments}
start=$SECONDS

python src/get_data.py --synthetic 256 --seed 0 --data-dir "$DATA"
python src/gen_spectrograms.py --data-dir "$DATA" --workers 2
python src/trainer.py --data-dir "$DATA" --out "$OUT" --run "demo-$(date +%Y%m%d-%H%M%S)" \
    --split random --train-size 192 --val-size 32 --epochs 6 --batch-size 8 --bn-momentum 0.1

echo "demo finished in $((SECONDS - start)) s"
