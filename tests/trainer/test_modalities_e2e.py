"""Image and text models end to end: raw files -> stoker's data pipeline -> 2 DeepSpeed workers."""

import json
import math

import numpy as np
import pytest

from stoker.config import parse_config
from stoker.datasets.prepare import prepare
from stoker.trainer.run import train

pytestmark = pytest.mark.slow


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_config(tmp_path, name, data, model, **train):
    return parse_config({
        "name": name, "storage": str(tmp_path / "runs"), "data": data, "model": model,
        "train": {"epochs": 2, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 0.01},
                  "deepspeed": {"zero_stage": 2}, **train},
        "scaling": {"num_workers": 2},
    }, "test")


def test_cnn_learns_an_image_folder(ray_cluster, tmp_path):
    from PIL import Image

    # 3 classes x 30 PNGs of 12x12 noise, each class tinted towards one colour channel: easy
    # for a CNN, impossible to guess (chance is 1/3).
    rng = np.random.default_rng(0)
    classes = ["red", "green", "blue"]
    for index, name in enumerate(classes):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(30):
            pixels = rng.integers(0, 140, (12, 12, 3))
            pixels[..., index] += 100
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "images" / name / f"{i}.png")
    data = {"source": str(tmp_path / "images"), "format": "images", "image": {"size": [8, 8], "channels": 3},
            "output": str(tmp_path / "prepared")}
    run = run_config(tmp_path, "cnn", data, {"name": "cnn", "channels": [8, 16]}, epochs=3)
    manifest = prepare(run.data)
    assert manifest.modality == "image" and manifest.input_shape == [3, 8, 8]

    result = train(run)
    assert result.test["accuracy"] >= 0.8, result.test
    assert set(result.test) >= {"accuracy", "f1", "roc_auc"}
    final = json.loads((result.run_dir / "final_metrics.json").read_text())
    assert len(final["test_details"]["confusion_matrix"]) == 3


def test_gpt_language_model_beats_a_uniform_guess(ray_cluster, tmp_path):
    # A small corpus from a tiny grammar: predictable enough that 2 epochs must do much better
    # than a uniform guess over the vocabulary (perplexity = vocabulary size).
    rng = np.random.default_rng(0)
    subjects, verbs, objects = ["the cat", "a dog", "the bird", "my friend"], ["sees", "likes", "chases"], \
        ["the ball", "a tree", "the house", "some food"]
    (tmp_path / "corpus").mkdir()
    for f in range(4):
        sentences = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} today" for _ in range(60)]
        (tmp_path / "corpus" / f"{f}.txt").write_text("\n".join(sentences) + "\n")
    data = {"source": str(tmp_path / "corpus"), "format": "text", "task": "language_modeling",
            "text": {"max_length": 8}, "output": str(tmp_path / "prepared")}
    model = {"name": "gpt", "embed_dim": 32, "num_heads": 2, "num_layers": 2}
    run = run_config(tmp_path, "gpt", data, model, batch_size=16, optimizer={"name": "adamw", "lr": 0.005})
    manifest = prepare(run.data)
    assert manifest.task == "language_modeling" and manifest.input_shape == [8]

    result = train(run)
    records = lines(result.run_dir / "metrics.jsonl")
    uniform = manifest.vocab_size
    assert records[-1]["val_perplexity"] < records[0]["val_perplexity"]
    assert result.test["perplexity"] < uniform / 2, (result.test, uniform)
    # Perplexity is exp of the mean token loss (padding excluded from both).
    assert result.test["perplexity"] == pytest.approx(math.exp(result.test["loss"]), rel=0.05)
