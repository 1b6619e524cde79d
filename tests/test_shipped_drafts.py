"""The drafts shipped in checkpoints/: small, with complete cards, tied to the default target's weights, and
refused by any other target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dovetail_jax.io import checkpoint
from dovetail_jax.io.registry import CHECKPOINTS_DIR, DEFAULT_DRAFTS, SMOLLM2_Q4_1_SHA256

SHIPPED = sorted(p for p in CHECKPOINTS_DIR.glob("*") if (p / "card.json").is_file())


def test_the_default_draft_is_shipped():
    assert DEFAULT_DRAFTS[SMOLLM2_Q4_1_SHA256] in {p.name for p in SHIPPED}
    assert len(SHIPPED) >= 5  # the default and the ablation variants


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_card_is_complete_and_files_small(folder: Path):
    card = json.loads((folder / "card.json").read_text())
    assert card["format"] == checkpoint.FORMAT
    assert card["target"]["sha256"] == SMOLLM2_Q4_1_SHA256
    assert card["draft"]["fusion"] in ("dgf", "eagle") and card["draft"]["num_layers"] >= 1
    assert card["training"]["steps"] > 0 and card["training"]["tokens"] > 100_000
    assert 0.0 < card["heldout"]["top1"] <= 1.0
    assert card["heldout_tau"]["server"]["tau"] >= 1.0
    size = (folder / "weights.safetensors").stat().st_size
    assert size < 50 * 2**20
    files = sorted(f.name for f in folder.iterdir())
    assert files in (["card.json", "weights.safetensors"], ["card.json", "vocab_order.npy", "weights.safetensors"])
    if "vocab_order.npy" in files:  # a ranking to widen the vocabulary along: 4 bytes per target id
        assert (folder / "vocab_order.npy").stat().st_size < 2**20


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_loads_for_its_target_only(folder: Path, smollm2_path):
    from dovetail_jax import api
    from dovetail_jax.errors import ModelFormatError

    target = api.load_target(smollm2_path, layout="in_out")
    draft = api.load_draft(target, folder)
    assert draft.cfg.num_layers >= 1
    if (folder / checkpoint.VOCAB_ORDER).is_file():  # its ranking is valid: the vocabulary widens along it
        wide = api.load_draft(target, folder, vocab_size=2 * draft.cfg.draft_vocab_size)
        assert int(wide.shared.head.shape[0]) == 2 * draft.cfg.draft_vocab_size
    other = checkpoint.read_card(folder)
    other["target"]["sha256"] = "0" * 64
    with pytest.raises(ModelFormatError):
        checkpoint.check_card_target(other, target.cfg, str(folder), target.sha256)
