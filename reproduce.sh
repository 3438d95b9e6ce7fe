#!/usr/bin/env bash
# The whole study on MTAT: get the data -> log-mel spectrograms -> the paper's recipe
# (trainer.py's defaults: 40 epochs, batch 32, Adam 1e-3) on the paper split and on the
# field's clean split, 3 seeds each; then the test of the paper's claim, the ablation: the
# single-scale network (--scales 1) on the clean split with the same 3 seeds, paired with
# the three-scale runs -> report.md (bootstrap intervals, the paired comparison and its
# verdict), curves.png and per_tag_gain.png (src/report.py).
#
# Needs: about 3 GB of disk for the MP3s (6 GB while extracting) and 4.2 GB for the
# spectrograms; a CUDA GPU; network access to MTAT's host
# unless DATA already holds it.
# Takes: not yet measured (9 runs of 40 epochs; see docs/results.md when measured).
#
#   bash reproduce.sh                              # data/ and experiments/study/
#   SEEDS="1337 1338" SPLITS=clean bash reproduce.sh
#
# Rerunning it is safe: finished runs (results.json present) are skipped, interrupted
# ones (last.pt present) resume with --resume, and stages 1 and 2 resume or skip by
# themselves. Settings, from the environment:
#   DATA        data folder (default: data)
#   OUT         where the run folders and the report go (default: experiments/study)
#   SPLITS      splits to train on (default: "paper clean")
#   ABLATION    splits of the ablation: --scales 1 against the three scales, seed by seed;
#               the three-scale runs are the SPLITS loop's own (default: clean; with
#               SYNTHETIC: the SPLITS; "" leaves the ablation out)
#   SEEDS       seeds of the weights, dropout and batch order (default: "1337 1338 1339");
#               the splits never depend on them
#   TRAIN_ARGS  extra trainer.py flags for every run (default: none)
#   WORKERS     processes computing spectrograms (default: 8)
#   SYNTHETIC   N: instead of MTAT, a synthetic set of N clips (a CI check of this script
#               at small size, with SPLITS=random and TRAIN_ARGS giving the sizes), e.g.
#               SYNTHETIC=32 SPLITS=random TRAIN_ARGS="--train-size 16 --val-size 8 --epochs 1
#               --batch-size 8 --device cpu" DATA=/tmp/s OUT=/tmp/s/study bash reproduce.sh
#               (the ablation then runs on the random split)
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data}
OUT=${OUT:-experiments/study}
SPLITS=${SPLITS:-paper clean}
SEEDS=${SEEDS:-1337 1338 1339}
TRAIN_ARGS=${TRAIN_ARGS:-}
WORKERS=${WORKERS:-8}
SYNTHETIC=${SYNTHETIC:-}
if [ -n "$SYNTHETIC" ]; then ABLATION=${ABLATION-$SPLITS}; else ABLATION=${ABLATION-clean}; fi
start=$SECONDS

if [ -n "$SYNTHETIC" ]; then
    # write once: a rerun must not replace the clips under finished runs
    [ -f "$DATA/annotations_final.csv" ] || python src/get_data.py --synthetic "$SYNTHETIC" --data-dir "$DATA"
else
    python src/get_data.py --data-dir "$DATA"
fi
python src/gen_spectrograms.py --data-dir "$DATA" --workers "$WORKERS"

# train RUN FLAGS...: one run, skipped when finished, resumed when interrupted
train() {
    local run=$1
    shift
    if [ -f "$OUT/$run/results.json" ]; then
        echo "$OUT/$run: finished, skipped"
        return
    fi
    local resume=()
    if [ -f "$OUT/$run/last.pt" ]; then
        resume=(--resume)
        echo "$OUT/$run: interrupted, resuming"
    fi
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
    python src/trainer.py --data-dir "$DATA" --out "$OUT" --run "$run" "$@" $TRAIN_ARGS "${resume[@]}"
}

for split in $SPLITS; do
    for seed in $SEEDS; do
        train "$split-seed$seed" --split "$split" --seed "$seed"
    done
done
# the paper's claim: three scales beat one; each single-scale run is paired with the
# three-scale run of its seed (the same clips): the loop above's, or made here
for split in $ABLATION; do
    for seed in $SEEDS; do
        case " $SPLITS " in
            *" $split "*) ;;
            *) train "$split-seed$seed" --split "$split" --seed "$seed" ;;
        esac
        train "$split-scales1-seed$seed" --split "$split" --seed "$seed" --scales 1
    done
done

python src/report.py "$OUT"
echo "study finished in $((SECONDS - start)) s: $OUT/report.md"
