"""bench.random_models: random weights of a real shape, written as a loadable model folder."""

from __future__ import annotations

import pytest
import torch

from bench.random_models import config_of, main, random_model
from shared.models import load_model
from tests.tiny import make_tiny_model_dir


@pytest.fixture(scope="module")
def shape(tmp_path_factory):
    folder = make_tiny_model_dir(tmp_path_factory.mktemp("shape"), arch="qwen2", layers=4, seed=2)
    (folder / "model.safetensors").unlink()  # only the config and the tokenizer are needed
    return folder


def test_the_same_seed_gives_the_same_weights(shape) -> None:
    a = random_model(config_of(shape), seed=5)
    b = random_model(config_of(shape / "config.json"), seed=5)
    c = random_model(config_of(shape), seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    d = random_model(config_of(shape), seed=5, dtype=torch.bfloat16, device="cpu", on_device=True)
    assert next(d.parameters()).dtype == torch.bfloat16 and d.config.num_hidden_layers == 4


def test_written_folder_loads_with_its_tokenizer(shape, tmp_path) -> None:
    assert main(["--config", str(shape), "--out", str(tmp_path / "m"), "--seed", "1"]) == 0
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    want = random_model(config_of(shape), seed=1).state_dict()
    assert all(torch.equal(w, want[k]) for k, w in loaded.model.state_dict().items())
    assert loaded.tokenizer("hello").input_ids  # the tokenizer files travelled with it


def test_missing_config_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["--config", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
