from setuptools import find_packages, setup

setup(
    name="autocdsr",
    version="0.1.0",
    description="Cross-domain sequential recommendation with Pareto-balanced self-attention "
                "(AutoCDSR / AutoCDSR+) and fused Triton attention + mass kernels",
    packages=find_packages(include=["autocdsr", "autocdsr.*", "kernels", "kernels.*", "bench"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.2", "numpy", "scipy", "pyarrow>=14",
                      "omegaconf>=2.3", "tqdm", "matplotlib"],
    extras_require={"dev": ["pytest", "pytest-benchmark", "hypothesis"]},
    entry_points={"console_scripts": ["autocdsr=autocdsr.cli:main"]},
)
