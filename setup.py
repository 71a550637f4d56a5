"""emigm-jax: masked image generation (MaskGIT, MAR, MDM, eMIGM) in JAX/Flax."""
import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent


def _requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _pinned(name: str) -> str:
    """The version requirements.txt pins for ``name`` (one place for the jax version)."""
    for req in _requirements():
        if req.startswith(f"{name}=="):
            return req.split("==", 1)[1]
    raise ValueError(f"requirements.txt does not pin {name}")


setup(
    name="emigm-jax",
    version="0.1.0",
    description="Effective and efficient masked image generation models in JAX/Flax",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["emigm_jax", "emigm_jax.*", "configs"]),
    install_requires=_requirements(),
    extras_require={
        "test": ["pytest==8.4.2", "pytest-xdist==3.8.0"],
        # PyTorch-side reading of official checkpoints and parity tests.
        # TPU VMs (and compile-only TPU plans on any host): jax[tpu] at the tested jax version
        # pulls the libtpu built for it (jax 0.10.2 -> libtpu 0.0.42.*).
        "tpu": [f"jax[tpu]=={_pinned('jax')}"],
        "interop": ["torch==2.14.1", "torchvision==0.29.1", "safetensors==0.8.0",
                    "diffusers==0.42.1", "pytorch-fid==0.3.0"],
    },
    entry_points={"console_scripts": ["emigm=emigm_jax.main:run"]},
)
