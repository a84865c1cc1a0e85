"""Layers by role (detector/layers.py): the rule gives back the shipped detectors' layers on the bundled model."""

from __future__ import annotations

import pytest
from torch import nn

from detector.layers import LayerError, layer_for_role, probe_layers, rebind_features


@pytest.fixture(scope="module")
def bundled_layers(bundled_model):
    return probe_layers(bundled_model, 224)


def test_roles_on_the_bundled_model_are_the_shipped_choices(bundled_layers):
    # head_block10 (1/16), lid_block4 (1/8), spectral_block0 (1/2): chosen by hand for the shipped detectors
    assert layer_for_role(bundled_layers, "@1/16") == "net._blocks.10"
    assert layer_for_role(bundled_layers, "@1/8") == "net._blocks.4"
    assert layer_for_role(bundled_layers, "@1/2") == "net._blocks.0"
    assert bundled_layers["net._blocks.10"].channels == 112


def test_the_bundled_default_is_left_as_it_is_on_the_bundled_model(bundled_model):
    from detector import Detector

    features = Detector.named("default").features
    rebound, moved = rebind_features(features, bundled_model, 224, reference=bundled_model)
    assert moved == {} and rebound == dict(features)


def test_another_architecture_gets_templates_at_the_same_roles(bundled_model):
    from detector import Detector

    class Small(nn.Module):  # strides 2, 4, 8, 16 with other names and channel counts
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU())
                                        for c in (3, 6, 12, 24)])
            self.fc = nn.Linear(48, 5)

        def forward(self, x):
            return self.fc(self.body(x).mean(dim=(2, 3)))

    features = Detector.named("default").features
    rebound, moved = rebind_features(features, Small().eval(), 64, reference=bundled_model)
    # the last module to finish at 1/16 is the Sequential itself (its output is body.3's)
    assert moved == {"head_block10": ("net._blocks.10", "body"), "lid_block4": ("net._blocks.4", "body.2")}
    assert not rebound["head_block10"].fitted and not rebound["lid_block4"].fitted
    assert rebound["logit_margin"] == features["logit_margin"]  # layer-free signals untouched


def test_a_role_the_model_lacks_names_what_it_has():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Flatten(), nn.LazyLinear(3))
    layers = probe_layers(model, 32)
    with pytest.raises(LayerError, match="no feature map at @1/16.*@1/2"):
        layer_for_role(layers, "@1/16")
