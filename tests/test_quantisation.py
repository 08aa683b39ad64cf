"""The per-layer rounding check: it rounds as dynamic-range int8 does, and reproduces the exported model."""

from __future__ import annotations

import numpy as np
import pytest

from fmnist import deploy, export, quantisation
from fmnist.model import build_network


def test_rounding_per_image_and_per_channel_keeps_256_levels_and_the_extremes():
    rng = np.random.default_rng(0)
    images = rng.random((3, 40, 40, 2)).astype(np.float32) * np.array([1.0, 10.0, 0.01])[:, None, None, None]
    rounded = quantisation.round_per_image(images)
    for image, original in zip(rounded, images, strict=True):
        step = original.max() / 255  # Non-negative values: the range is [0, max].
        assert np.abs(image - original).max() <= step / 2 + 1e-7
        assert len(np.unique(image)) <= 256
    assert quantisation.round_per_image(np.zeros((1, 4), dtype=np.float32)).tolist() == [[0, 0, 0, 0]]
    kernel = rng.normal(size=(3, 3, 2, 4)).astype(np.float32) * np.array([1.0, 0.1, 5.0, 1e-3])
    rounded = quantisation.round_per_channel(kernel)
    np.testing.assert_allclose(np.abs(rounded).max(axis=(0, 1, 2)), np.abs(kernel).max(axis=(0, 1, 2)), rtol=1e-6)
    for channel in range(4):
        step = np.abs(kernel[..., channel]).max() / 127
        assert np.abs(rounded[..., channel] - kernel[..., channel]).max() <= step / 2 + 1e-7


def test_the_simulated_rounding_reproduces_the_exported_int8_model(tmp_path):
    model = build_network("bn_cnn", width=8, stages=(1, 1, 1), head="flatten")
    images = np.random.default_rng(1).random((200, 28, 28, 1), dtype=np.float32)
    plain = quantisation.probabilities_with_rounding(model, images, {})
    np.testing.assert_allclose(plain, model.predict(images, verbose=0), atol=1e-5)
    rows = {row["layer"]: row for row in quantisation.layer_sensitivity(model, images)}
    # The first convolution (72 weights) stays float32 in dynamic range; the others are quantised, and rounding
    # them in NumPy moves the probabilities as far as the exported int8 file does.
    assert not rows["stage1_conv1"]["quantised"] and rows["stage2_conv1"]["quantised"]
    assert rows["stage2_conv1"]["p99_both"] > 0 and rows["stage2_conv1"]["weights"] == 3 * 3 * 8 * 16
    path = export.write_model(export.to_int8(model), tmp_path / "int8.tflite")
    served = deploy.probability_agreement(path, images, plain)["p99"]
    simulated = rows["all quantised layers"]["p99_both"]
    assert simulated == pytest.approx(served, rel=0.02, abs=1e-6), (simulated, served)
    with pytest.raises(ValueError, match="name Conv2D or Dense layers"):
        quantisation.probabilities_with_rounding(model, images, {"stage1_pool": "both"})
    with pytest.raises(ValueError, match="images is empty"):
        quantisation.layer_sensitivity(model, images[:0])
    with pytest.raises(ValueError, match="'weights', 'inputs' or 'both'"):
        quantisation.probabilities_with_rounding(model, images, {"stage1_conv1": "all"})


def test_quantisation_aware_fine_tuning_snaps_the_weights_and_the_export_keeps_them(tmp_path):
    import tensorflow as tf

    model = build_network("bn_cnn", width=8, stages=(1, 1, 1), head="flatten")
    rng = np.random.default_rng(2)
    images = rng.random((256, 28, 28, 1), dtype=np.float32)
    targets = np.eye(10, dtype=np.float32)[np.arange(256) % 10]
    quantised = quantisation.quantised_layers(model)
    assert quantised == ["stage2_conv1", "stage3_conv1", "probabilities"]
    batches = tf.data.Dataset.from_tensor_slices((images, targets)).batch(64).repeat()
    before = [np.asarray(model.get_layer(name).kernel).copy() for name in quantised]
    messages = []
    history = quantisation.fine_tune(
        model,
        batches,
        steps_per_epoch=4,
        epochs=2,
        learning_rate=1e-3,
        consistency_weight=100.0,
        say=messages.append,
    )
    assert len(history["loss"]) == len(history["consistency"]) == len(history["epoch_seconds"]) == 2
    assert all(value > 0 for value in history["consistency"]) and len(messages) == 2
    assert "quantisation-aware epoch 2/2" in messages[-1]
    for name, old in zip(quantised, before, strict=True):
        kernel = np.asarray(model.get_layer(name).kernel)
        assert not np.allclose(kernel, old)  # It trained...
        np.testing.assert_array_equal(quantisation.round_per_channel(kernel), kernel)  # ...and sits on the grid.
    # So rounding the weights again changes nothing, and the int8 file differs from the float model only by the
    # rounding of the layers' inputs, which the simulation reproduces.
    plain = quantisation.probabilities_with_rounding(model, images, {})
    weights_only = quantisation.probabilities_with_rounding(model, images, dict.fromkeys(quantised, "weights"))
    assert deploy.probability_difference(weights_only, plain)["max"] < 1e-5
    path = export.write_model(export.to_int8(model), tmp_path / "int8.tflite")
    served = deploy.probability_agreement(path, images, plain)["p99"]
    inputs_only = quantisation.probabilities_with_rounding(model, images, dict.fromkeys(quantised, "inputs"))
    assert deploy.probability_difference(inputs_only, plain)["p99"] == pytest.approx(served, rel=0.02, abs=1e-6)
    with pytest.raises(ValueError, match="must be at least 1"):
        quantisation.fine_tune(model, batches, steps_per_epoch=4, epochs=0, learning_rate=1e-3, consistency_weight=1.0)


def test_the_consistency_term_brings_the_int8_model_closer_to_the_float_one():
    """The same fine-tuning of the same trained model, with and without the consistency term: with it, the
    int8 model's probabilities end closer to the float model's."""
    import tensorflow as tf

    from fmnist import training
    from fmnist.recipes import Recipe

    rng = np.random.default_rng(3)
    labels = np.arange(1280) % 10
    images = rng.random((1280, 28, 28, 1), dtype=np.float32) * 0.3
    for label in range(10):  # Each class lights up its own band of rows, more or less brightly.
        chosen = labels == label
        images[chosen, 2 * label + 4 : 2 * label + 7] += rng.uniform(0.1, 0.6, size=(chosen.sum(), 1, 1, 1))
    recipe = Recipe.from_params(
        "short", {"architecture": "bn_cnn", "width": 8, "epochs": 3, "patience": 0, "precision": "float32"}
    )
    trained = training.fit(recipe, images, labels, images[:200], labels[:200], seed=0, verbose=0).model
    start = trained.get_weights()
    batches = tf.data.Dataset.from_tensor_slices((images, np.eye(10, dtype=np.float32)[labels])).batch(64).repeat()
    quantised = quantisation.quantised_layers(trained)
    distances = {}
    for weight in (0.0, 1e6):
        trained.set_weights(start)
        quantisation.fine_tune(
            trained, batches, steps_per_epoch=20, epochs=3, learning_rate=3e-4, consistency_weight=weight, say=print
        )
        plain = quantisation.probabilities_with_rounding(trained, images, {})
        served = quantisation.probabilities_with_rounding(trained, images, dict.fromkeys(quantised, "both"))
        distances[weight] = deploy.probability_difference(served, plain)["p99"]
    print(distances)
    assert distances[1e6] < 0.7 * distances[0.0], distances


def test_equalising_the_channels_changes_nothing_the_float_model_computes():
    model = build_network("bn_cnn", width=8, stages=(1, 2, 1), head="flatten")
    rng = np.random.default_rng(5)
    # Batch norms with uneven scales, as training leaves them.
    for layer in model.layers:
        if layer.name.endswith("_bn"):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([gamma * rng.uniform(0.1, 3.0, gamma.shape), beta + 0.1, mean, variance])
    images = rng.random((300, 28, 28, 1), dtype=np.float32)
    before = model.predict(images, verbose=0)
    equalised = quantisation.equalise_channels(model, images)
    assert equalised == ["stage2_conv1", "stage2_conv2", "stage3_conv1"]
    np.testing.assert_allclose(model.predict(images, verbose=0), before, atol=1e-5)
    # Every channel feeding stage2_conv2 now reaches the same range.
    import keras

    feeding = keras.Model(model.inputs, model.get_layer("stage2_conv1_relu").output).predict(images, verbose=0)
    ranges = np.percentile(feeding.reshape(-1, feeding.shape[-1]), 99.99, axis=0)
    live = ranges > 1e-3 * ranges.max()
    np.testing.assert_allclose(ranges[live], ranges.max(), rtol=1e-3)


def test_a_separable_first_convolution_stays_float_and_the_simulation_still_matches_the_export(tmp_path):
    from keras import layers

    from fmnist.model import multiply_adds
    from fmnist.recipes import Recipe

    model = build_network("bn_cnn", width=8, stages=(1, 1, 1), head="flatten", separable_stages=(2,))
    separable = model.get_layer("stage2_conv1")
    assert isinstance(separable, layers.SeparableConv2D)
    # 3x3 per channel of 8 inputs, then 8 x 16 across them, on the 14x14 map.
    plain = build_network("bn_cnn", width=8, stages=(1, 1, 1), head="flatten")
    saved = 14 * 14 * (9 * 8 * 16 - (9 * 8 + 8 * 16))
    assert multiply_adds(plain) - multiply_adds(model) == saved
    # Stage 2's first convolution is no longer rounded; stage 3's still is.
    assert quantisation.quantised_layers(model) == ["stage3_conv1", "probabilities"]
    images = np.random.default_rng(4).random((200, 28, 28, 1), dtype=np.float32)
    reference = quantisation.probabilities_with_rounding(model, images, {})
    np.testing.assert_allclose(reference, model.predict(images, verbose=0), atol=1e-5)
    simulated = quantisation.probabilities_with_rounding(
        model, images, dict.fromkeys(quantisation.quantised_layers(model), "both")
    )
    path = export.write_model(export.to_int8(model), tmp_path / "int8.tflite")
    served = deploy.litert_probabilities(path, images)
    # The other layers are still rounded, and the simulation rounds them as the file does.
    rounding = deploy.probability_difference(served, reference)["p99"]
    assert rounding > 0
    assert deploy.probability_difference(served, simulated)["p99"] < 0.1 * rounding
    # Equalisation passes over the separable convolution (its input is not rounded) to the next one, and the
    # fine-tuning keeps the float layer's weights: only the rounded layers and batch normalisation train.
    import tensorflow as tf

    assert quantisation.equalise_channels(model, images) == ["stage3_conv1"]
    before = [weight.copy() for weight in separable.get_weights()]
    gamma = model.get_layer("stage2_conv1_bn").gamma.numpy().copy()
    targets = np.eye(10, dtype=np.float32)[np.arange(200) % 10]
    batches = tf.data.Dataset.from_tensor_slices((images, targets)).batch(50).repeat()
    quantisation.fine_tune(
        model, batches, steps_per_epoch=2, epochs=1, learning_rate=1e-3, consistency_weight=10.0, say=lambda _: None
    )
    for kept, weight in zip(before, separable.get_weights(), strict=True):
        np.testing.assert_array_equal(kept, weight)
    assert not np.allclose(model.get_layer("stage2_conv1_bn").gamma.numpy(), gamma)
    # A separable convolution whose kernels int8 would quantise is refused, not simulated wrongly.
    wide = build_network("bn_cnn", width=32, stages=(1, 1, 1), head="flatten", separable_stages=(2,))
    with pytest.raises(ValueError, match="stage2_conv1 has a kernel of 1,024 weights or more"):
        quantisation.quantised_layers(wide)
    with pytest.raises(ValueError, match="separable_stages=\\[1\\] must name distinct stages from 2 to 3"):
        Recipe(name="bad", architecture="bn_cnn", separable_stages=(1,))
    with pytest.raises(ValueError, match="separable_stages=\\[2, 2\\]"):
        Recipe(name="bad", architecture="bn_cnn", separable_stages=[2, 2])
    with pytest.raises(ValueError, match="belong to bn_cnn"):
        Recipe(name="bad", separable_stages=(2,))
    assert Recipe.from_params("ok", {"architecture": "bn_cnn", "separable_stages": [2]}).as_dict()[
        "separable_stages"
    ] == [2]
