"""Vision and speech front-ends: shapes, masks, the errors that name the bad input, every
backend and torch.compile; the two examples learn their generated data."""

import pytest
import torch
from harness import assert_close, require_backend
from torchscale.component.embedding import VisionEmbedding

import magneto
from magneto.speech import subsampled_length

D, HEADS, FFN = 32, 4, 64


# ------------------------------------------------------------------------------------------
# vision


def test_patch_embedding_is_torchscales_vision_embedding():
    torch.manual_seed(0)
    theirs = VisionEmbedding(16, 4, 3, D, contain_mask_token=True, prepend_cls_token=True)
    with torch.no_grad():
        theirs.cls_token.normal_()
        theirs.mask_token.normal_()
    ours = magneto.PatchEmbedding(16, 4, 3, D, mask_token=True, cls_token=True)
    ours.load_state_dict(theirs.state_dict())
    images = torch.randn(2, 3, 16, 16)
    masked = torch.rand(2, 16) > 0.5
    out = ours(images, masked)
    assert out.shape == (2, 17, D) and ours.num_position_embeddings() == 17
    assert torch.equal(out, theirs(images, masked))
    assert torch.equal(out[:, 1:][masked], ours.mask_token[0].expand(int(masked.sum()), D))


@pytest.mark.parametrize(
    "images,masked,name",
    [
        (torch.randn(2, 3, 16, 12), None, "image size"),
        (torch.randn(2, 1, 16, 16), None, "channels"),
        (torch.randn(3, 16, 16), None, "images"),
        (torch.randn(2, 3, 16, 16), torch.zeros(2, 15, dtype=torch.bool), "masked_position"),
    ],
)
def test_patch_embedding_errors(images, masked, name):
    embed = magneto.PatchEmbedding(16, 4, 3, D, mask_token=True)
    with pytest.raises(ValueError, match=name):
        embed(images, masked)
    with pytest.raises(ValueError, match="mask_token"):
        magneto.PatchEmbedding(16, 4, 3, D)(
            torch.randn(1, 3, 16, 16), torch.zeros(1, 16, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="patch_size"):
        magneto.PatchEmbedding(8, 16, 3, D)


def _vit(backend):
    torch.manual_seed(0)
    config = magneto.vision_encoder_config(
        embed_dim=D, num_heads=HEADS, ffn_dim=FFN, layers=2, backend=backend
    )
    return magneto.VisionTransformer(config, num_classes=5, img_size=16, patch_size=4)


def _grads(model, *inputs):
    out = model(*inputs)
    out = out["encoder_out"] if isinstance(out, dict) else out
    g = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=g)).sum()
    return out, torch.autograd.grad(loss, list(model.parameters()))


def _check_against_reference(build, backend, inputs, name):
    """The model ``build(backend)`` gives on a fused backend: its output and every parameter's
    gradient are the reference backend's; returns the output."""
    require_backend(backend)
    ref_out, ref_grads = _grads(build("reference"), *inputs)
    model = build(backend)
    out, grads = _grads(model, *inputs)
    assert_close(out, ref_out, 1e-5, name=name)
    for (param, _), g, ref in zip(model.named_parameters(), grads, ref_grads):
        assert_close(g, ref, 1e-5, atol=1e-6, name=f"grad {param}")
    return out


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_vision_transformer_on_fused_backends_matches_reference(backend):
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = _check_against_reference(_vit, backend, (images,), "logits")
    assert out.shape == (2, 5)


def test_vision_transformer_compiles():
    require_backend("cpu")
    model = _vit("cpu").eval()
    images = torch.randn(2, 3, 16, 16)
    eager = model(images)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)(images)
    assert_close(compiled, eager, 1e-5, name="compiled logits")


# ------------------------------------------------------------------------------------------
# speech


def _speech(backend, in_features=20):
    torch.manual_seed(0)
    config = magneto.speech_encoder_config(
        embed_dim=D, num_heads=HEADS, ffn_dim=FFN, layers=2, max_positions=64, backend=backend
    )
    return magneto.SpeechEncoder(config, in_features=in_features, channels=8)


def test_subsampling_shapes_and_masks():
    front = magneto.ConvSubsampling(in_features=20, embed_dim=D, channels=8)
    features = torch.randn(3, 50, 20)
    lengths = torch.tensor([50, 30, 7])
    x, mask = front(features, lengths)
    assert x.shape == (3, subsampled_length(50), D) == (3, 11, D)
    assert mask.dtype == torch.bool and mask.shape == (3, 11)
    assert (~mask).sum(1).tolist() == [subsampled_length(n) for n in (50, 30, 7)] == [11, 6, 1]
    # valid output frames see only valid input frames: changing the padding changes nothing
    padded = features.clone()
    padded[1, 30:] = 100.0
    y, _ = front(padded, lengths)
    assert torch.equal(y[1][~mask[1]], x[1][~mask[1]])
    assert front(features)[1] is None
    assert magneto.lengths_to_padding_mask(torch.tensor([2, 0]), 3).tolist() == [
        [False, False, True],
        [True, True, True],
    ]


@pytest.mark.parametrize(
    "features,lengths,name",
    [
        (torch.randn(2, 50, 21), None, "feature width"),
        (torch.randn(2, 50, 20), torch.tensor([51, 20]), "longer than the input"),
        (torch.randn(2, 50, 20), torch.tensor([50]), "lengths"),
        (torch.randn(2, 50, 20), torch.tensor([50.0, 20.0]), "integer"),
        (torch.randn(2, 50, 20), torch.tensor([50, 6]), "lengths must be >= 7"),
        (torch.randn(2, 6, 20), None, "frames"),
        (torch.randn(50, 20), None, "features"),
    ],
)
def test_subsampling_errors(features, lengths, name):
    front = magneto.ConvSubsampling(in_features=20, embed_dim=D, channels=8)
    with pytest.raises(ValueError, match=name):
        front(features, lengths)


def test_lengths_to_padding_mask_errors():
    with pytest.raises(ValueError, match="input's length"):
        magneto.lengths_to_padding_mask(torch.tensor([4]), 3)
    with pytest.raises(ValueError, match="1-D integer"):
        magneto.lengths_to_padding_mask(torch.tensor([[1]]), 3)


def test_speech_encoder_ignores_padding():
    model = _speech("reference").eval()
    features = torch.randn(2, 40, 20)
    lengths = torch.tensor([40, 24])
    out = model(features, lengths)
    mask = out["encoder_padding_mask"]
    assert out["encoder_out"].shape == (2, 9, D) and mask[1].sum() == 9 - subsampled_length(24)
    alone = model(features[1:, :24], lengths[1:])["encoder_out"]
    assert_close(out["encoder_out"][1, : alone.shape[1]], alone[0], 1e-5, name="padded vs alone")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_speech_encoder_on_fused_backends_matches_reference(backend):
    features = torch.randn(2, 40, 20, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([40, 24])
    _check_against_reference(_speech, backend, (features, lengths), "encoder_out")


def test_speech_encoder_compiles():
    require_backend("cpu")
    model = _speech("cpu").eval()
    features, lengths = torch.randn(2, 40, 20), torch.tensor([40, 24])
    eager = model(features, lengths)["encoder_out"]
    torch._dynamo.reset()
    compiled = torch.compile(model)(features, lengths)["encoder_out"]  # length checks: breaks
    assert_close(compiled, eager, 1e-5, name="compiled encoder_out")


# ------------------------------------------------------------------------------------------
# examples


def test_examples_learn_their_generated_data(capsys):
    from magneto.examples import image_classification, speech_classification

    assert image_classification.main(["--steps", "60"]) > 0.9
    assert speech_classification.main(["--steps", "120"]) > 0.6
