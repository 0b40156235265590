"""LoRA adapters: targets, ranks, trained side, zero init, merge and removal."""

import pytest
import torch
from torch import nn

from fedrac.adapters import (
    AdapterConfigError,
    LayerSpec,
    adapter_factors,
    attach_adapters,
    check_rank,
    find_target_layers,
    merge_adapters,
    remove_adapters,
    resolve_trained,
)
from fedrac.models import MLP


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.block = nn.ModuleDict({"q_proj": nn.Linear(8, 6), "v_proj": nn.Linear(8, 8)})
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        h = self.conv(x).flatten(1)[:, :8]
        h = self.block["q_proj"](h).sum(1, keepdim=True) + self.block["v_proj"](h)
        return self.out(torch.cat([h, h], dim=1))


def _random_factors(layers, rank, gen):
    return {n: (torch.randn(rank, s.d_in, generator=gen), torch.randn(s.d_out, rank, generator=gen))
            for n, s in layers.items()}


def test_target_patterns_match_names_suffixes_globs_and_all():
    net = Net()
    assert set(find_target_layers(net, ["q_proj"])) == {"block.q_proj"}
    assert set(find_target_layers(net, ["block.*"])) == {"block.q_proj", "block.v_proj"}
    assert set(find_target_layers(net, "all")) == {"conv", "block.q_proj", "block.v_proj", "out"}
    conv = find_target_layers(net, ["conv"])["conv"]
    assert (conv.d_out, conv.d_in) == (4, 27)


def test_pattern_matching_nothing_names_the_key_and_choices():
    with pytest.raises(AdapterConfigError, match=r"model.target_modules=\['k_proj'\] matches no"):
        find_target_layers(Net(), ["k_proj"])


def test_rank_limits():
    layers = find_target_layers(MLP(64, [64, 64], 5), "all")
    check_rank(layers, 5)
    with pytest.raises(AdapterConfigError, match=r"strategy.rank=6 is larger than layer 'head'"
                                                 r" \(64->5\) allows; allowed: 1..5"):
        check_rank(layers, 6)
    with pytest.raises(AdapterConfigError, match="strategy.rank=0 must be a positive"):
        check_rank(layers, 0)


def test_auto_trains_the_smaller_factor():
    assert resolve_trained(LayerSpec("a", (5, 64)), "auto") == "B"   # B: 5r < A: 64r
    assert resolve_trained(LayerSpec("b", (64, 8)), "auto") == "A"   # A: 8r < B: 64r
    assert resolve_trained(LayerSpec("c", (8, 8)), "A") == "A"
    with pytest.raises(AdapterConfigError, match="strategy.train_factor='C'"):
        resolve_trained(LayerSpec("c", (8, 8)), "C")


@pytest.mark.parametrize("trained", ["A", "B", "both"])
def test_forward_equals_merged_weights_and_only_trained_factors_learn(trained):
    gen = torch.Generator().manual_seed(0)
    net = Net()
    x = torch.randn(5, 3, 6, 6, generator=gen)
    layers = find_target_layers(net, "all")
    factors = _random_factors(layers, 2, gen)
    attach_adapters(net, layers, factors, rank=2, alpha=3.0,
                    trained={n: trained for n in layers})
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    want = {"A": {"lora_A"}, "B": {"lora_B"}, "both": {"lora_A", "lora_B"}}[trained]
    assert trainable and {n.rsplit(".", 1)[1] for n in trainable} == want
    w_conv = net.conv.weight.detach().clone()
    y_adapted = net(x)
    assert torch.equal(net.conv.weight, w_conv)  # the forward path never rebuilds W
    y_adapted.sum().backward()
    assert net.conv.weight.grad is None  # and never forms its gradient
    merge_adapters(net)
    expected_conv = w_conv + 1.5 * (factors["conv"][1] @ factors["conv"][0]).reshape(4, 3, 3, 3)
    assert torch.allclose(net.conv.weight, expected_conv, atol=1e-6)
    assert not adapter_factors(net)
    assert torch.allclose(net(x), y_adapted, atol=1e-5)
    assert isinstance(net.conv.weight, nn.Parameter)


def test_zero_init_starts_at_the_global_weights_and_remove_restores_them():
    gen = torch.Generator().manual_seed(1)
    net = MLP(10, [7], 3)
    x = torch.randn(4, 10, generator=gen)
    before = net(x).detach()
    layers = find_target_layers(net, "all")
    factors = {n: (torch.zeros(1, s.d_in), torch.randn(s.d_out, 1, generator=gen))
               for n, s in layers.items()}
    attach_adapters(net, layers, factors, 1, 1.0, {n: "A" for n in layers})
    assert torch.equal(net(x), before)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net(x).pow(2).sum().backward()
    opt.step()
    assert not torch.allclose(net(x), before)
    got = adapter_factors(net)
    assert set(got) == {"fc1.lora_A", "head.lora_A"}
    remove_adapters(net)
    assert torch.equal(net(x), before)
