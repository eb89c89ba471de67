"""The toy stand-ins pre-trained like real checkpoints: the LM on caption text, the encoder contrastive."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hive_adapter.data.synthetic import PROMPT, SyntheticShapes, caption_vocabulary
from hive_adapter.model.loading import load_vision_encoder
from hive_adapter.tools.toy_models import ToySizes, write_toy_models
from hive_adapter.tools.toy_pretraining import ToyPretraining, pretrain_toy_models, siglip_loss

SMALL = ToySizes(image_size=32, patch_size=8, vision_width=32, vision_layers=4, text_width=64, text_layers=2)
QUICK = ToyPretraining(language_steps=60, vision_steps=100, batch_size=32, vision_images=512)


@torch.no_grad()
def caption_text_loss(directory) -> float:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    held_out = SyntheticShapes(32, seed=5)  # not the pre-training split
    texts = [f"{tokenizer.bos_token} {PROMPT} {held_out.sample(i).caption} {tokenizer.eos_token}" for i in range(32)]
    ids = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    return model(**ids, labels=ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)).loss.item()


def test_pretraining_writes_both_models_back_having_learned_their_objective(tmp_path):
    write_toy_models(tmp_path / "random", caption_vocabulary(), sizes=SMALL)
    write_toy_models(tmp_path / "trained", caption_vocabulary(), sizes=SMALL)
    curves = pretrain_toy_models(tmp_path / "trained", QUICK)
    assert len(curves["language"]) == 60 and len(curves["vision"]) == 100
    assert sum(curves["vision"][-10:]) / 10 < 0.5 * curves["vision"][0]  # the contrastive loss more than halves
    assert caption_text_loss(tmp_path / "trained" / "language") < 0.5 * caption_text_loss(
        tmp_path / "random" / "language"
    )
    random_encoder = load_vision_encoder(tmp_path / "random" / "vision").state_dict()
    trained_encoder = load_vision_encoder(tmp_path / "trained" / "vision").state_dict()
    assert random_encoder.keys() == trained_encoder.keys()  # a plain encoder: the contrastive heads are not saved
    assert any(not torch.equal(random_encoder[name], trained_encoder[name]) for name in random_encoder)


def test_zero_steps_leave_a_model_untouched_and_bad_settings_are_named(tmp_path):
    write_toy_models(tmp_path, caption_vocabulary(), sizes=SMALL)
    before = load_vision_encoder(tmp_path / "vision").state_dict()
    curves = pretrain_toy_models(tmp_path, ToyPretraining(language_steps=2, vision_steps=0, batch_size=4))
    assert curves["vision"] == [] and len(curves["language"]) == 2
    after = load_vision_encoder(tmp_path / "vision").state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    with pytest.raises(ValueError, match="vision_steps=-1"):
        ToyPretraining(vision_steps=-1)


def test_siglip_loss_counts_pairs_with_the_same_caption_as_positives():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    scale, bias = torch.tensor(3.0), torch.tensor(-5.0)
    aligned = siglip_loss(images, images, same, scale, bias)
    assert aligned < siglip_loss(images, images, torch.eye(3, dtype=torch.bool), scale, bias)  # duplicates agree
    assert aligned < siglip_loss(images, images.flip(0), same, scale, bias)
