"""PatchGAN discriminator (Isola et al., pix2pix, CVPR 2017), as taming-transformers' NLayerDiscriminator
used by the LDM autoencoders: each output logit judges one overlapping patch of the input."""

from __future__ import annotations

from torch import nn


def init_weights(module: nn.Module) -> None:
    """pix2pix initialisation: conv weights N(0, 0.02), batch-norm scales N(1, 0.02)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """Image (B, C, H, W) -> patch logits (B, 1, h, w): n_layers stride-2 4x4 convs, one stride-1 conv,
    then a 1-channel conv; channels ndf * min(2**n, 8), batch norm after every conv but the first and last."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),  # bias: batch norm has one
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, x):
        return self.main(x)
