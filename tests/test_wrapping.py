"""magneto.compat.wrapping.wrapped_layers on torchscale 0.3.0 models built with ``fsdp=True``:
outside fairscale's ``enable_wrap`` nothing is wrapped; inside it every layer is (fairscale's
FlattenParamsWrapper and FullyShardedDataParallel, the latter built on a one-process gloo group);
torch's FSDP2 ``fully_shard`` and FSDP1 (GPU only: FSDP1 refuses a CPU-only machine)."""

import pytest
import torch
from fairscale.nn import FlattenParamsWrapper, enable_wrap
from fairscale.nn import FullyShardedDataParallel as FairscaleFSDP
from gloo import one_process_group
from harness import assert_close
from torchscale.architecture.config import DecoderConfig, EncoderConfig
from torchscale.architecture.decoder import Decoder as TSDecoder
from torchscale.architecture.encoder import Encoder as TSEncoder

from magneto.compat.torchscale import from_torchscale
from magneto.compat.wrapping import wrapped_layers


def _encoder(**options):
    args = EncoderConfig(
        encoder_embed_dim=16,
        encoder_attention_heads=2,
        encoder_ffn_embed_dim=32,
        encoder_layers=2,
        fsdp=True,
        **options,
    )
    return TSEncoder(args)


@pytest.fixture
def process_group():
    with one_process_group():
        yield


@pytest.mark.parametrize("options", [{}, {"checkpoint_activations": True}], ids=["", "ckpt"])
def test_fsdp_flag_outside_enable_wrap_wraps_nothing(options):
    model = _encoder(**options)
    assert wrapped_layers(model) == []
    decoder = TSDecoder(
        DecoderConfig(
            decoder_embed_dim=16,
            decoder_attention_heads=2,
            decoder_ffn_embed_dim=32,
            decoder_layers=2,
            fsdp=True,
        )
    )
    assert wrapped_layers(decoder) == []


def test_flatten_params_wrapper_inside_enable_wrap():
    with enable_wrap(wrapper_cls=FlattenParamsWrapper):
        model = _encoder()
    assert wrapped_layers(model) == ["layers.0", "layers.1"]
    assert wrapped_layers(model.layers[1]) == [""]


def test_from_torchscale_refuses_wrapped_layers_and_converts_the_flag_alone():
    """fsdp=True converts when nothing is wrapped; wrapped layers are refused by name."""
    model = _encoder()
    converted = from_torchscale(model)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = model(None, token_embeddings=x)["encoder_out"]
        assert_close(converted(None, token_embeddings=x)["encoder_out"], expected, 1e-5)
    with enable_wrap(wrapper_cls=FlattenParamsWrapper):
        wrapped = _encoder()
    with pytest.raises(ValueError, match="fsdp: layers.0, layers.1 wrapped"):
        from_torchscale(wrapped)


def test_fairscale_fsdp_inside_enable_wrap(process_group):
    with enable_wrap(wrapper_cls=FairscaleFSDP):
        model = _encoder()
    assert all(isinstance(layer, FairscaleFSDP) for layer in model.layers)
    # the outermost wrappers only, not the FlattenParamsWrapper inside each
    assert wrapped_layers(model) == ["layers.0", "layers.1"]


def test_fsdp2_fully_shard(process_group):
    from torch.distributed.fsdp import fully_shard

    model = _encoder()
    fully_shard(model.layers[1])
    assert wrapped_layers(model) == ["layers.1"]
    fully_shard(model)
    assert wrapped_layers(model) == [""]


@pytest.mark.gpu
def test_fsdp1_wrapped_layer(process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = _encoder().cuda()
    model.layers[0] = FullyShardedDataParallel(
        model.layers[0], device_id=torch.cuda.current_device()
    )
    assert wrapped_layers(model) == ["layers.0"]
