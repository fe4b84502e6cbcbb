from setuptools import find_packages, setup

setup(
    name="nodepert_dist",
    version="0.1.0",
    description="Multi-device, sharded node-perturbation training in JAX",
    packages=find_packages(include=["nodepert_dist", "nodepert_dist.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "jaxlib>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "grain>=0.2.18",
        "numpy",
        "absl-py",
        "tensorstore>=0.1.86",
        "matplotlib",  # learning-curve plots (nodepert-plot)
        # SLURM hostlists (first host of "r[1-2]-n[07-08]-ib,login"): one small pure-Python
        # module from a supercomputing centre (NSC), maintained for years, no dependencies; it
        # knows every form SLURM writes, which jax's own parser does not. ClusterShell does the
        # same with far more than we need (node sets, remote execution).
        "python-hostlist>=2.0",
    ],
    # pytest-xdist: two test processes on a 2-core CI machine; the suite waits on subprocesses,
    # locks and signals a lot (one process kept the load near 1.5): 18.5 vs 25+ min measured
    # ruff: the project's linter and formatter (ruff.toml); tests/test_lint.py keeps the code
    # within its rules, so CI needs it. One static binary, no dependencies.
    # cuda12: the NVIDIA GPU build of the jax this project is tested with (jax's own extra pulls
    # jax-cuda12-plugin[with-cuda] of the same version, CUDA and cuDNN wheels included); a plain
    # install on a GPU node is CPU-only. `nodepert-train --require_gpu` says so in one line.
    extras_require={
        "test": ["pytest", "pytest-xdist", "ruff>=0.15"],
        "cuda12": ["jax[cuda12]==0.10.2"],
    },
    entry_points={
        "console_scripts": [
            "nodepert-train=nodepert_dist.train:cli",
            "nodepert-plot=nodepert_dist.plot:cli",
            "nodepert-experiment=nodepert_dist.experiments.__main__:main",
        ]
    },
)
