"""CAMPPlus (CAM++) speaker embedding: D-TDNN with context-aware masking, 192-d x-vector.

token2wav conditions the flow decoder on a speaker embedding of the reference voice. The official
pipeline runs ``campplus.onnx`` on CPU with input = Kaldi fbank (80 bins, 16 kHz, dither 0) minus its
mean over time, shape [1, T, 80], and uses the 192-d output (official §7). This module rebuilds that
network in PyTorch with the published CAM++ shape (3D-Speaker, Wang et al. 2023):

* ``head`` (FCM): Conv2d 1->32 (3x3) + BN + ReLU, two stages of two 2-D residual blocks (the first of
  each stage halves the frequency axis), Conv2d 32->32 stride (2, 1) + BN + ReLU; 80 bins -> 10, so
  32 * 10 = 320 channels per frame.
* ``xvector``: ``tdnn`` (Conv1d 320->128, k=5, stride 2, BN, ReLU); three CAM dense blocks of 12 / 24 /
  16 layers (growth 32, bottleneck 4 * 32 = 128, k=3, dilation 1 / 2 / 2), each followed by a transit
  layer (BN, ReLU, 1x1 conv halving the channels): 128 -> 512 -> 256 -> 1024 -> 512 -> 1024 -> 512;
  ``out_nonlinear`` (BN, ReLU); ``stats`` (mean and unbiased std over time, 1024); ``dense`` (1x1 conv
  1024->192 + BatchNorm without affine).
* Each dense layer: BN, ReLU, 1x1 conv to 128, BN, ReLU, then a CAM layer: a local dilated conv to 32
  channels multiplied by a sigmoid mask computed from the global mean plus 100-frame segment means of
  its input (1x1 conv 128->64, ReLU, 1x1 conv 64->32).

Dimensions that the spec does not state (all widths above) are fields of ``CAMPPlusConfig`` and default
to the published CAM++ values; the 192-d output and the 80-bin input are fixed by the spec.

Mapping ``campplus.onnx`` initializers onto this module (the ONNX file is not in the state-dict tsv):

1. Module and parameter names follow the 3D-Speaker reference layout, so every initializer whose name
   is a key of ``CAMPPlus.state_dict()`` (e.g. ``xvector.block1.tdnnd1.nonlinear1.batchnorm.weight``,
   ``...cam_layer.linear1.weight``, ``xvector.transit2.linear.weight``, BN ``running_mean`` /
   ``running_var``) loads directly after checking its shape.
2. The TorchScript ONNX exporter folds a BatchNorm that directly follows a conv into that conv and
   emits anonymous ``onnx::Conv_<n>`` weight/bias pairs. Those pairs belong, in graph order, to:
   head.conv1+bn1, each residual block's conv1+bn1, conv2+bn2 and shortcut.0+shortcut.1, head.conv2+bn2,
   xvector.tdnn.linear+nonlinear.batchnorm, every dense layer's linear1+nonlinear2.batchnorm, and
   xvector.dense.linear+nonlinear.batchnorm. Walk the graph's Conv nodes in topological order, match each
   to the next module of that list with the same weight shape, copy the weight into the conv and express
   the folded bias b through the BN so that BN(x) = x + b: for an affine BN set weight=1, bias=b,
   running_mean=0, running_var=1-eps; for the affine-free ``dense`` BN set running_mean=-b,
   running_var=1-eps.
3. After loading, ``embed`` of a reference wav must reproduce the ONNX output (cosine ~1.0); that check
   needs the official file and is not part of the offline test-suite.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..configuration.configuration_token2wav import CAMPPlusConfig
from .audio_frontends_token2wav import FBANK_SAMPLE_RATE, InvalidAudioError, kaldi_fbank_16k


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([("batchnorm", nn.BatchNorm1d(channels)), ("relu", nn.ReLU())]))


class ResBlock2d(nn.Module):
    """2-D residual block of the FCM head; ``stride`` subsamples the frequency axis only."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=(stride, 1), bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class FCMHead(nn.Module):
    """Front-end convolution module: 2-D convs over (frequency, time), flattened to channels x time."""

    def __init__(self, config: CAMPPlusConfig):
        super().__init__()
        width = config.head_channels
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._stage(width, config.head_blocks[0])
        self.layer2 = self._stage(width, config.head_blocks[1])
        self.conv2 = nn.Conv2d(width, width, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.out_channels = width * ((config.feat_dim + 7) // 8)

    @staticmethod
    def _stage(width: int, num_blocks: int) -> nn.Sequential:
        """Residual blocks; the first halves the frequency axis."""
        return nn.Sequential(*[ResBlock2d(width, width, 2 if i == 0 else 1) for i in range(num_blocks)])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, F, T] -> [B, C * F / 8, T]."""
        x = F.relu(self.bn1(self.conv1(features[:, None])))
        x = self.layer2(self.layer1(x))
        x = F.relu(self.bn2(self.conv2(x)))
        return x.flatten(1, 2)


class TDNNLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.linear = nn.Conv1d(
            in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, bias=False
        )
        self.nonlinear = _bn_relu(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class CAMLayer(nn.Module):
    """Context-aware masking: a local conv output gated by a mask from utterance + segment context."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, dilation: int, reduction: int, segment: int
    ):
        super().__init__()
        self.segment = segment
        padding = (kernel_size - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
        )
        self.linear1 = nn.Conv1d(in_channels, in_channels // reduction, 1)
        self.relu = nn.ReLU()
        self.linear2 = nn.Conv1d(in_channels // reduction, out_channels, 1)

    def _segment_means(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over each ``segment``-frame window, broadcast back to every frame of that window."""
        pooled = F.avg_pool1d(x, self.segment, self.segment, ceil_mode=True)
        return pooled.repeat_interleave(self.segment, dim=-1)[..., : x.shape[-1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = x.mean(dim=-1, keepdim=True) + self._segment_means(x)
        mask = torch.sigmoid(self.linear2(self.relu(self.linear1(context))))
        return self.linear_local(x) * mask


class CAMDenseTDNNLayer(nn.Module):
    def __init__(self, in_channels: int, config: CAMPPlusConfig, kernel_size: int, dilation: int):
        super().__init__()
        bottleneck = config.bottleneck_scale * config.growth_rate
        self.nonlinear1 = _bn_relu(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bottleneck, 1, bias=False)
        self.nonlinear2 = _bn_relu(bottleneck)
        self.cam_layer = CAMLayer(
            bottleneck, config.growth_rate, kernel_size, dilation, config.cam_reduction, config.cam_segment_frames
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class CAMDenseTDNNBlock(nn.ModuleDict):
    """Densely connected stack: every layer sees the concatenation of the input and all earlier outputs."""

    def __init__(self, in_channels: int, num_layers: int, config: CAMPPlusConfig, kernel_size: int, dilation: int):
        super().__init__(
            OrderedDict(
                (
                    f"tdnnd{i + 1}",
                    CAMDenseTDNNLayer(in_channels + i * config.growth_rate, config, kernel_size, dilation),
                )
                for i in range(num_layers)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.values():
            x = torch.cat([x, layer(x)], dim=1)
        return x


class TransitLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.nonlinear = _bn_relu(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class StatsPool(nn.Module):
    """Concatenate mean and unbiased standard deviation over time: [B, C, T] -> [B, 2C]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=True)], dim=-1)


class DenseLayer(nn.Module):
    """Embedding projection: 1x1 conv then a BatchNorm without affine parameters."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = nn.Sequential(OrderedDict([("batchnorm", nn.BatchNorm1d(out_channels, affine=False))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x[..., None])[..., 0])


class CAMPPlus(nn.Module):
    """Mean-normalised fbank [B, T, 80] -> speaker embedding [B, 192]."""

    def __init__(self, config: CAMPPlusConfig | None = None):
        super().__init__()
        self.config = config = config or CAMPPlusConfig()
        self.head = FCMHead(config)
        channels = config.init_channels
        layers: list[tuple[str, nn.Module]] = [("tdnn", TDNNLayer(self.head.out_channels, channels, 5, stride=2))]
        for index, (num_layers, kernel, dilation) in enumerate(
            zip(config.block_layers, config.block_kernel_sizes, config.block_dilations), start=1
        ):
            layers.append((f"block{index}", CAMDenseTDNNBlock(channels, num_layers, config, kernel, dilation)))
            channels += num_layers * config.growth_rate
            layers.append((f"transit{index}", TransitLayer(channels, channels // 2)))
            channels //= 2
        layers += [
            ("out_nonlinear", _bn_relu(channels)),
            ("stats", StatsPool()),
            ("dense", DenseLayer(2 * channels, config.embedding_size)),
        ]
        self.xvector = nn.Sequential(OrderedDict(layers))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.xvector(self.head(features.transpose(1, 2)))


class SpeakerEmbedder(CAMPPlus):
    """CAMPPlus plus its front-end: ``embed(wav16k) -> Tensor[192]`` for one reference voice."""

    def features(self, wav16k, sample_rate: int = FBANK_SAMPLE_RATE) -> torch.Tensor:
        """Kaldi fbank minus its mean over time: [T, 80]."""
        fbank = kaldi_fbank_16k(wav16k, sample_rate)
        if fbank.shape[0] < self.config.min_frames:
            raise InvalidAudioError(
                f"speaker audio is too short: {fbank.shape[0]} fbank frames, need at least {self.config.min_frames}"
            )
        return fbank - fbank.mean(dim=0, keepdim=True)

    @torch.no_grad()
    def embed(self, wav16k: np.ndarray | torch.Tensor, sample_rate: int = FBANK_SAMPLE_RATE) -> torch.Tensor:
        """16 kHz mono audio -> 192-d embedding (inference statistics, whatever the module's mode)."""
        parameter = next(self.parameters())
        features = self.features(wav16k, sample_rate).to(device=parameter.device, dtype=parameter.dtype)
        was_training = self.training
        self.eval()
        try:
            return self(features[None])[0]
        finally:
            self.train(was_training)


__all__ = ["CAMPPlus", "CAMPPlusConfig", "SpeakerEmbedder"]
