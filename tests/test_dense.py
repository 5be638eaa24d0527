"""§3.2 dense evaluation: FC layers as convolutions give the FC network's scores on a crop."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vggdist.dense import DenseVGG, to_dense
from vggdist.init import init_weights
from vggdist.models import build_vgg
from vggdist.paper import SCALES

MINI = SCALES["mini"]


def _model(config="A", batch_norm=False, crop_size=32, **kw):
    torch.manual_seed(0)
    scale = {**MINI, "crop_size": crop_size, **kw}
    model = build_vgg(config, 6, **scale, batch_norm=batch_norm)
    init_weights(model, "glorot")  # std 1e-2 would make every score ~0 and the comparison vacuous
    if batch_norm:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
    return model.double().eval()


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("config, crop_size", [("A", 32), ("C", 32), ("A-LRN", 64)])
def test_dense_equals_fc_on_a_crop(config, crop_size, batch_norm):
    model = _model(config, batch_norm, crop_size)
    dense = to_dense(model)
    assert isinstance(dense, DenseVGG) and not dense.training
    k = crop_size // 32
    assert dense.classifier[0].kernel_size == (k, k)
    assert dense.classifier[3].kernel_size == dense.classifier[6].kernel_size == (1, 1)
    x = torch.randn(3, 3, crop_size, crop_size, dtype=torch.float64)
    with torch.no_grad():
        logits, score_map = model(x), dense(x)
    assert score_map.shape == (3, 6, 1, 1)
    assert logits.std() > 1e-3  # non-trivial scores
    torch.testing.assert_close(score_map[:, :, 0, 0], logits, rtol=1e-10, atol=1e-12)


def test_score_map_on_larger_image_is_the_fc_head_on_every_window():
    # Crop 64 (fc6 reads a 2x2 feature window) on a 128x160 image: features 4x5, score map 3x4, each cell
    # the FC head on the 2x2 window of the feature map at that position (stride 1 in feature cells).
    model = _model("B", crop_size=64)
    dense = to_dense(model)
    x = torch.randn(1, 3, 128, 160, dtype=torch.float64)
    with torch.no_grad():
        score_map, features = dense(x), model.features(x)
        assert features.shape[-2:] == (4, 5) and score_map.shape == (1, 6, 3, 4)
        for i in range(3):
            for j in range(4):
                window = features[:, :, i : i + 2, j : j + 2].flatten(1)
                torch.testing.assert_close(
                    score_map[:, :, i, j], model.classifier(window), rtol=1e-10, atol=1e-12
                )


def test_paper_scale_kernel_is_7x7_and_map_size():
    with torch.device("meta"):
        dense = to_dense(build_vgg("D", 1000))
        out = dense(torch.empty(1, 3, 256, 341))  # shapes only, on the meta device
    assert dense.classifier[0].weight.shape == (4096, 512, 7, 7)
    assert out.shape == (1, 1000, 8 - 7 + 1, 10 - 7 + 1)


def test_dense_shares_no_storage_with_the_fc_net():
    model = _model("A")
    dense = to_dense(model)
    fc_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not fc_ptrs & {p.untyped_storage().data_ptr() for p in dense.parameters()}
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = dense(x).clone()
        for p in model.parameters():
            p.add_(1.0)
        torch.testing.assert_close(dense(x), before)


def test_dense_rejects_small_images_and_non_vgg():
    dense = to_dense(_model("A"))
    with pytest.raises(ValueError, match="smallest side"):
        dense(torch.randn(1, 3, 16, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="VGG"):
        to_dense(nn.Linear(2, 2))


def test_dense_keeps_train_mode_and_trains():
    model = build_vgg("A", 6, **MINI).train()
    dense = to_dense(model)
    assert dense.training
    loss = F.cross_entropy(dense(torch.randn(2, 3, 32, 32)).flatten(1), torch.tensor([0, 1]))
    loss.backward()
    assert dense.classifier[0].weight.grad is not None


def test_resnet_is_its_own_dense_form():
    # Global average pooling then FC: the fully-convolutional test of He et al. §3.4 is the network as is.
    from vggdist.resnet import ResNet, build_resnet

    torch.manual_seed(0)
    model = build_resnet("resnet-20", 6).double().train()
    dense = to_dense(model)
    assert isinstance(dense, ResNet) and dense is not model and dense.training
    own = {p.data_ptr() for p in model.parameters()}
    assert not own & {p.data_ptr() for p in dense.parameters()}
    model.eval(), dense.eval()
    x = torch.randn(2, 3, 45, 61, dtype=torch.float64)
    torch.testing.assert_close(dense(x), model(x), rtol=0, atol=0)
    # averaging the FC scores over positions = FC of the averaged features (FC is affine)
    with torch.no_grad():
        features = model.layer3(model.layer2(model.layer1(model.relu(model.bn1(model.conv1(x))))))
        per_position = torch.einsum("nchw,kc->nkhw", features, model.fc.weight) + model.fc.bias[:, None, None]
    torch.testing.assert_close(per_position.mean(dim=(2, 3)), model(x))
