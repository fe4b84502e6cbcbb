#!/usr/bin/env bash
# The main job: NP vs SGD on MNIST (fc 784-500-500-10), then the learning-curve plot.
# Sets up .venv if needed, fetches MNIST, trains both on the machine's fastest layout (every
# accelerator; on a CPU-only machine 1 CPU device: simulated devices share the same cores and
# measured ~3x slower, so they are for testing the multi-device path, e.g. --cpu_devices=8),
# writes runs/mnist_{np,sgd}/ and runs/mnist_np_vs_sgd.png.
# Extra arguments go to both training runs, e.g.  bash launch/mnist_np_vs_sgd.sh --num_epochs=3
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/nodepert-train ] || { python3 -m venv .venv && .venv/bin/pip install -q -e .; }
.venv/bin/python -m nodepert_dist.data fetch mnist --data_dir=data
COMMON=(--dataset=mnist --network=fc --batchsize=128 --num_epochs=10 --seed=0)
# NP: the best settings of docs/results/variance.md that keep this job under 5 minutes on the
# 2-core CPU: layer-wise perturbation (finite differences, sigma 1e-3), cross-entropy, Adam with
# cosine decay. The original code's settings were --loss=mse --lr=0.02 (plain SGD).
.venv/bin/nodepert-train "${COMMON[@]}" --update_rule=np --loss=ce --optimizer=adam --lr=1e-3 \
    --lr_schedule=cosine --sigma=1e-3 --np_layerwise --workdir=runs/mnist_np "$@"
.venv/bin/nodepert-train "${COMMON[@]}" --update_rule=sgd --loss=mse --lr=1.0 --workdir=runs/mnist_sgd "$@"
.venv/bin/nodepert-plot --workdirs=runs/mnist_np,runs/mnist_sgd --out=runs/mnist_np_vs_sgd.png
