"""The classifier-based feature detector learns the classes and exports with EDM's detector interface."""

import numpy as np
import torch
from click.testing import CliRunner

import dataset_tool
import train_detector
from training.evaluation import classifier_detector

#----------------------------------------------------------------------------

def two_class_images(n, seed=0):
    """Class 0: bright left half; class 1: bright right half; plus noise. uint8 [n, 1, 8, 8]."""
    rnd = np.random.RandomState(seed)
    labels = rnd.randint(0, 2, size=n)
    images = rnd.randint(0, 60, size=[n, 1, 8, 8])
    for i, label in enumerate(labels):
        images[i, :, :, (0 if label == 0 else 4):(4 if label == 0 else 8)] += 180
    return images.astype(np.uint8), labels

def test_detector_learns_separable_classes_and_features_separate_them():
    images, labels = two_class_images(200)
    model, accuracies = classifier_detector.train_classifier_detector(images, labels, num_classes=2, epochs=8, batch_size=32, progress=False)
    test_images, test_labels = two_class_images(100, seed=1)
    assert classifier_detector.classifier_accuracy(model, test_images, test_labels) > 0.95
    features = model(torch.as_tensor(test_images), return_features=True)
    assert features.shape == (100, 64)
    centroid_gap = (features[test_labels == 0].mean(0) - features[test_labels == 1].mean(0)).norm()
    assert centroid_gap > features[test_labels == 0].std(0).norm() # Classes are apart in feature space.

def test_exported_detector_is_torchscript_taking_uint8_rgb_of_any_size(tmp_path):
    images, labels = two_class_images(64)
    model, _ = classifier_detector.train_classifier_detector(images, labels, num_classes=2, epochs=1, progress=False)
    classifier_detector.export_detector(model, str(tmp_path / 'det.pt'))
    loaded = torch.jit.load(str(tmp_path / 'det.pt'))
    rgb = torch.as_tensor(images[:5]).repeat(1, 3, 1, 1)
    assert torch.allclose(loaded(rgb, return_features=True), model(torch.as_tensor(images[:5]), return_features=True), atol=1e-5)
    assert loaded(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), return_features=True).shape == (2, 64) # Resized to 8x8.

def test_cli_trains_on_a_labelled_dataset_and_refuses_unlabelled_ones(tmp_path):
    images, labels = two_class_images(60)
    rows = np.concatenate([np.round(images.reshape(60, 64) / 255 * 16), labels[:, None]], axis=1).astype(int)
    np.savetxt(tmp_path / 'digits.csv', rows, fmt='%d', delimiter=',')
    assert CliRunner().invoke(dataset_tool.main, ['--source', str(tmp_path / 'digits.csv'), '--dest', str(tmp_path / 'd.zip')]).exit_code == 0
    result = CliRunner().invoke(train_detector.main, ['--data', str(tmp_path / 'd.zip'), '--dest', str(tmp_path / 'det.pt'), '--epochs=3'])
    assert result.exit_code == 0, result.output
    assert 'Held-out accuracy' in result.output and (tmp_path / 'det.pt').is_file()
    (tmp_path / 'plain').mkdir()
    import PIL.Image
    PIL.Image.fromarray(images[0, 0]).save(tmp_path / 'plain' / 'a.png')
    PIL.Image.fromarray(images[1, 0]).save(tmp_path / 'plain' / 'b.png')
    result = CliRunner().invoke(train_detector.main, ['--data', str(tmp_path / 'plain'), '--dest', str(tmp_path / 'x.pt')])
    assert result.exit_code != 0 and 'has no labels' in result.output and not (tmp_path / 'x.pt').exists()

#----------------------------------------------------------------------------
