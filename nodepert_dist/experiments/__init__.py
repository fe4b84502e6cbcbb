"""The paper's experiments as commands: `python -m nodepert_dist.experiments NAME [--flags]`.

Each writes tidy results (CSV, JSONL) and its plot (PNG) under --out, and resumes when rerun.
"""

# name -> (module, what it does); the module has `main(argv)` for absl.app.run
EXPERIMENTS = {
    "vary-lr": ("vary_lr", "final and best test accuracy vs lr, NP and SGD, over seeds"),
    "grad-stats": ("grad_stats", "NP update vs the true gradient every k steps while training"),
    "crash-timing": (
        "crash_timing",
        "when NP crashes over an lr grid; replay of a crash step by step",
    ),
    "linesearch": (
        "linesearch",
        "loss change after one NP / SGD step vs lr (critical, optimal lr) vs width",
    ),
    "delta-loss": ("delta_loss", "loss change per update, k times per epoch, NP and SGD"),
    "adam-np": ("adam_np", "Adam on NP gradients vs plain NP over an lr grid"),
    "landscape": ("landscape", "loss surface around the final point with the PCA trajectory"),
    "scaling": ("width_depth", "final accuracy and the largest stable lr vs width and depth"),
}
