"""magneto: the Magneto ("Foundation Transformers", Wang et al. 2022) backbone in PyTorch.

Sub-LayerNorm Transformer blocks whose every "norm then linear" pair and residual add runs
through the fused ops of ``magneto_kernels`` (pure-PyTorch reference, Triton, C++/CUDA), with
Magneto's DeepNet-derived init, Pre-LN / Post-LN / DeepNorm variants for comparison,
multiway layers and BEiT-3 (``magneto.multiway``, ``magneto.beit3``), vision and speech
front-ends, and torchscale 0.3.0 compatibility (``magneto.compat.torchscale``).
"""

from magneto.attention import MultiheadAttention
from magneto.beit3 import BEiT3
from magneto.config import MagnetoConfig
from magneto.decoder import Decoder
from magneto.embeddings import (
    LearnedPositionalEmbedding,
    SinusoidalPositionalEmbedding,
    TokenEmbedding,
    build_output_projection,
)
from magneto.encoder import Encoder
from magneto.encoder_decoder import EncoderDecoder
from magneto.feedforward import FeedForward
from magneto.fusion import UnfusedWarning
from magneto.init import LayerScales, layer_scales
from magneto.layers import DecoderLayer, DropPath, EncoderLayer
from magneto.multiway import Multiway
from magneto.norm import NormLayer
from magneto.speech import (
    ConvSubsampling,
    SpeechEncoder,
    lengths_to_padding_mask,
    speech_encoder_config,
)
from magneto.vision import PatchEmbedding, VisionTransformer, vision_encoder_config

__all__ = [
    "MagnetoConfig",
    "MultiheadAttention",
    "FeedForward",
    "EncoderLayer",
    "DecoderLayer",
    "Encoder",
    "Decoder",
    "EncoderDecoder",
    "TokenEmbedding",
    "LearnedPositionalEmbedding",
    "SinusoidalPositionalEmbedding",
    "build_output_projection",
    "NormLayer",
    "UnfusedWarning",
    "DropPath",
    "LayerScales",
    "layer_scales",
    "Multiway",
    "BEiT3",
    "PatchEmbedding",
    "VisionTransformer",
    "vision_encoder_config",
    "ConvSubsampling",
    "SpeechEncoder",
    "lengths_to_padding_mask",
    "speech_encoder_config",
]
