"""nexttoken: decoder-only language-model architectures in JAX, from a laptop CPU to a pod."""

from setuptools import find_packages, setup

setup(
    name='nexttoken',
    version='0.1.0',
    description='A JAX research codebase for language-model architectures: attention, MoE, Mamba '
                'and hybrids, with scaling-law and grokking experiments.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=find_packages(include=['model', 'model.*', 'train', 'train.*', 'eval', 'eval.*',
                                    'experiments', 'experiments.*']),
    install_requires=[
        # Lower bounds are the versions the test suite runs with; the upper bounds keep the
        # fast-moving JAX stack to the minor releases it was tested on.
        'jax>=0.10.2,<0.11',
        'flax>=0.12.8,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12.8,<0.13',
        'ml-collections>=1.1',
        'absl-py>=2.1',
        'numpy>=2.0',
        'sentencepiece>=0.2',
        'tensorflow-datasets>=4.9.10',   # builders and data sources; TensorFlow is not needed
        'array-record>=0.8',
        'grain>=0.2.18',
        'importlib_resources',           # TFDS's catalog builders (tiny_shakespeare) import it
        'tensorboardX>=2.6',             # writes the event files
        'tensorboard>=2.17',             # `tensorboard --logdir runs/` reads them
        'matplotlib>=3.8',
        'scipy>=1.11',
        'threadpoolctl>=3.1',            # one BLAS thread for the scaling fits' tiny problems
        'tqdm>=4.66',
    ],
    extras_require={
        'dev': ['pytest>=8', 'pytest-xdist>=3.5'],  # tests run in parallel (-n auto)
        # The TPU compiler, for --compile_for on a machine without TPUs (docs/tpu.md): jax's own
        # tpu extra pins the libtpu built for this jax (0.0.42). Linux only, 213 MB; not in dev,
        # which must install anywhere (CI installs both).
        'tpu': ['jax[tpu]==0.10.2'],
        # The PyTorch peer of the nanoGPT benchmark (python -m experiments.benchmark.pytorch),
        # timed in its CPU build: here pip finds torch-2.13.0+cpu in PIP_FIND_LINKS; elsewhere add
        # --extra-index-url https://download.pytorch.org/whl/cpu. Its tests skip without it.
        'peer': ['torch==2.13.0'],
    },
)
