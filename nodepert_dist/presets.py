"""Named settings: preset name -> overrides of `config.Config` fields (plain data, one place).

Every preset is declared once here (a leaf module: it imports nothing). `nodepert-train
--config=NAME` and the experiments' `--preset=NAME` read PRESETS; an experiment command starts
from its preset (`EXPERIMENT_PRESETS`). Flags given on the command line win. Add one as a dict of
Config field names to values (config.overrides checks them against the fields).
"""

# The original code's settings (docs/design/original_code.md): MSE on sigmoid outputs, batch
# 100, w <- w - lr*dw, sigma 1e-4 (fc) / 1e-5 (conv). The lrs are this engine's measured
# choices on MNIST (docs/results/): NP learns steadily at 0.02 on fc 2x500, SGD at 1.0.
_MNIST_FC = dict(
    dataset="mnist",
    network="fc",
    n_hl=2,
    hl_size=500,
    batchsize=100,
    loss="mse",
    optimizer="sgd",
    wd=0.0,
)
_CIFAR_CONV = dict(dataset="cifar10", network="conv", batchsize=100, loss="mse", optimizer="sgd")

PRESETS = {
    # NP with the original code's settings: fc 784-500-500-10 at the stable NP lr
    "mnist_fc_np": dict(_MNIST_FC, update_rule="np", lr=0.02, num_epochs=10),
    "mnist_fc_sgd": dict(_MNIST_FC, update_rule="sgd", lr=1.0, num_epochs=10),
    "mnist_fc_np_adam": dict(_MNIST_FC, update_rule="np", optimizer="adam", lr=1e-4, num_epochs=10),
    # the best NP measured here on fc 784-500-500-10 (docs/results/local_decorrelation.md):
    # layer-wise passes, 8 noise draws, Adam with a cosine lr, cross-entropy; no backprop
    "mnist_best_np": dict(
        _MNIST_FC,
        update_rule="np",
        loss="ce",
        optimizer="adam",
        lr=1e-3,
        lr_schedule="cosine",
        sigma=1e-3,
        np_layerwise=True,
        np_draws=8,
        num_epochs=20,
    ),
    # the original crash figure's network: fc 3x500, crashes above lr ~0.004 within 200 epochs
    "mnist_fc3_np_crash": dict(_MNIST_FC, update_rule="np", n_hl=3, lr=0.01, num_epochs=200),
    "mnist_linfc_np": dict(_MNIST_FC, network="linfc", update_rule="np", lr=0.01, num_epochs=10),
    "cifar10_conv_np": dict(_CIFAR_CONV, update_rule="np", lr=0.005, num_epochs=50),
    "cifar10_conv_sgd": dict(_CIFAR_CONV, update_rule="sgd", lr=0.1, num_epochs=50),
    "cifar10_conv_large_np": dict(
        _CIFAR_CONV, network="conv-large", update_rule="np", lr=0.001, num_epochs=100
    ),
    # tiny: 1000 training examples (the rest held out), 1 hidden layer of 16: CI and smoke runs
    "tiny": dict(
        dataset="mnist",
        network="fc",
        n_hl=1,
        hl_size=16,
        batchsize=100,
        validation_size=59000,
        eval_train=False,
        eval_batchsize=4000,
        num_epochs=2,
    ),
}

# The base run of each experiment command (its lr/rule flags sweep around it).
EXPERIMENT_PRESETS = {
    "vary-lr": "mnist_fc_np",
    "grad-stats": "mnist_fc_np",
    "crash-timing": "mnist_fc3_np_crash",
    "linesearch": "mnist_fc_sgd",
    "delta-loss": "mnist_fc_np",
    "adam-np": "mnist_fc_np",
    "landscape": "mnist_fc_np",
    "scaling": "mnist_fc_np",
}
