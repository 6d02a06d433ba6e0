"""segresnet_vae's z-score (``NormalizeNonzeroIntensityd``) equals MONAI's
``NormalizeIntensityd(nonzero=True, channel_wise=True)`` to float32 rounding, on contiguous tensors and on the
strided view a crop returns, with an empty and a constant channel."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import NormalizeIntensityd

from brats_pipeline.transforms.preprocessing import NormalizeNonzeroIntensityd


def test_matches_monai_nonzero_channel_wise():
    g = torch.Generator().manual_seed(0)
    full = torch.zeros(4, 40, 36, 30)
    full[:, 8:30, 6:28, 5:25] = torch.rand(4, 22, 22, 20, generator=g) * 900 + 40
    full[2] = 0.0  # an empty channel stays 0
    full[3, 8:30, 6:28, 5:25] = 7.0  # a constant channel: std 0 -> divided by 1
    for image in (full.clone(), full[:, 4:36, 2:34, 1:29]):  # contiguous, and a crop's strided view
        ours = NormalizeNonzeroIntensityd("image")({"image": MetaTensor(image.clone())})["image"]
        monai = NormalizeIntensityd("image", nonzero=True, channel_wise=True)({"image": MetaTensor(image.clone())})[
            "image"
        ]
        assert isinstance(ours, MetaTensor) and ours.dtype == torch.float32 and ours.shape == image.shape
        np.testing.assert_allclose(ours.numpy(), monai.numpy(), rtol=1e-5, atol=1e-5)
        assert torch.equal(ours[image == 0], torch.zeros(int((image == 0).sum())))
    z = ours[0][image[0] != 0]
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std(unbiased=False)) - 1.0) < 1e-5
