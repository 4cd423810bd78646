"""describe() of a checkpoint written as training writes one."""

import json
import math

import jax

from charrnn import checkpoint, config as config_lib, loading, model
from charrnn.config import Config, ModelConfig
from charrnn.inspect_checkpoint import describe


def write_small_checkpoint(directory, step):
    config = Config(model=ModelConfig(cell="gru", num_layers=2, hidden_size=8, embedding_size=4))
    vocab = "\n !abc"
    params = model.init_params(jax.random.key(0), config.model, len(vocab))
    metadata = {"config": config_lib.to_dict(config), "vocab": vocab, "corpus_sha": "0" * 16, "step": step,
                "elapsed_s": 1.5, "val_loss": 1.25, "best_val_loss": 1.2, "chars_seen": 128 * step, "saved_at": 0.0}
    path = checkpoint.step_path(directory, step)
    checkpoint.write(path, checkpoint.flatten(params, "params"), metadata)
    return path, vocab


def test_describe_a_small_checkpoint(tmp_path):
    path, vocab = write_small_checkpoint(tmp_path, 10)

    summary = describe(loading.load(path))

    assert json.loads(json.dumps(summary)) == summary  # ready for --json
    assert summary["path"] == str(path) and summary["file_bytes"] == path.stat().st_size
    assert summary["format_version"] == checkpoint.FORMAT_VERSION
    assert (summary["step"], summary["val_loss"], summary["best_val_loss"]) == (10, 1.25, 1.2)
    assert summary["config"]["model"]["cell"] == "gru" and summary["config"]["model"]["hidden_size"] == 8
    assert summary["vocab"] == vocab and summary["vocab_size"] == 6
    shapes = summary["parameter_shapes"]
    assert shapes["params/embedding"] == [6, 4]
    assert shapes["params/layers/0/w_x"] == [4, 24] and shapes["params/layers/1/w_h"] == [8, 24]
    assert shapes["params/layers/1/b_hn"] == [8] and shapes["params/output/w"] == [8, 6]
    assert summary["parameter_count"] == sum(math.prod(shape) for shape in shapes.values())


def test_a_checkpoint_rotated_away_while_it_is_read_gives_way_to_the_newer_one(tmp_path, monkeypatch):
    """A live run saves step 20 and deletes step 10 between `load` listing the directory and reading the file."""
    old, _ = write_small_checkpoint(tmp_path, 10)
    real_read = checkpoint.read_bytes

    def read_after_a_save(path):
        if path == old and path.exists():
            write_small_checkpoint(tmp_path, 20)
            old.unlink()
        return real_read(path)

    monkeypatch.setattr(checkpoint, "read_bytes", read_after_a_save)
    trained = loading.load(tmp_path)
    assert trained.path == checkpoint.step_path(tmp_path, 20) and trained.metadata["step"] == 20
    assert describe(trained)["file_bytes"] == trained.path.stat().st_size
