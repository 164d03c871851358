"""The same digits CNN in Keras, saved as .keras, .h5 and a SavedModel folder for the converter.

    python examples/digits_keras.py digits_cnn.keras
    modelserve convert digits_cnn.keras -o cnn.onnx          # or --to tflite --float16 -o cnn.tflite
"""

from __future__ import annotations

import sys

import numpy as np


def cnn():
    import keras

    return keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10),
    ])


def digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The split of ``digits_torch.digits`` in Keras' channels-last layout: float32 [N, 8, 8, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = len(x) * 3 // 4
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train(epochs: int = 10, seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    x_train, y_train, _, _ = digits()
    model = cnn()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)
    return model


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "digits_cnn.keras"
    model = train()
    model.save(out)
    _, _, x_test, y_test = digits()
    print(f"saved {out}; held-out accuracy {(model.predict(x_test, verbose=0).argmax(1) == y_test).mean():.3f}")
