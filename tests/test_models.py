import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap

from explaind.models import (
    CNN_COMPONENTS,
    TRANSFORMER_COMPONENTS,
    ModAddTransformer,
    ResNet9,
    group_parameters,
)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def transformer_count(p: int, d: int, d_mlp: int) -> int:
    vocab = p + 2
    embed, pos, attn = vocab * d, 4 * d, 4 * d * d
    mlp = (d * d_mlp + d_mlp) + (d_mlp * d + d)
    return embed + pos + attn + mlp + d * vocab


def conv_count(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


def resnet9_count(c: int, w: int, classes: int) -> int:
    return (conv_count(c, w, 3) + conv_count(w, 2 * w, 5) + 2 * conv_count(2 * w, 2 * w, 3)
            + conv_count(2 * w, 4 * w, 3) + 2 * conv_count(4 * w, 4 * w, 3)
            + conv_count(4 * w, 2 * w, 3) + 2 * w * classes)


def tokens(p: int, pairs: list[tuple[int, int]]) -> torch.Tensor:
    return torch.tensor([[a, p, b, p + 1] for a, b in pairs])


def test_transformer_parameter_count_matches_formula():
    assert n_params(ModAddTransformer(113, 64, 4, 512)) == transformer_count(113, 64, 512) == 97_472
    assert n_params(ModAddTransformer(23, 32, 4, 64)) == transformer_count(23, 32, 64)


def test_resnet9_parameter_count_matches_formula():
    assert n_params(ResNet9(3, 2, 64)) == resnet9_count(3, 64, 2) == 2_272_512
    assert n_params(ResNet9(1, 2, 16)) == resnet9_count(1, 16, 2)


@pytest.mark.parametrize("model, groups", [
    (ModAddTransformer(11, 16, 4, 32), TRANSFORMER_COMPONENTS),
    (ResNet9(1, 2, 4), CNN_COMPONENTS),
])
def test_components_partition_the_parameters(model, groups):
    grouped = group_parameters(model, groups)
    names = [name for members in grouped.values() for name in members]
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())
    assert all(grouped.values())


def test_group_parameters_refuses_unassigned_parameter():
    with pytest.raises(ValueError, match="unembed.weight"):
        group_parameters(ModAddTransformer(11, 16, 4, 32), {"rest": ["embed", "pos", "attn", "mlp"]})


def test_transformer_outputs_log_probabilities():
    torch.manual_seed(0)
    model = ModAddTransformer(13, 16, 4, 32).double()
    out = model(tokens(13, [(1, 2), (12, 0), (5, 5)]))
    assert out.shape == (3, 15) and out.dtype == torch.float64
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3, dtype=torch.float64))


def test_transformer_rejects_wrong_shape():
    with pytest.raises(ValueError, match="unsqueeze"):
        ModAddTransformer(13, 16, 4, 32)(torch.tensor([1, 13, 2, 14]))
    with pytest.raises(ValueError, match="divisible"):
        ModAddTransformer(13, 18, 4, 32)


def test_attention_is_causal():
    torch.manual_seed(0)
    model = ModAddTransformer(13, 16, 4, 32).double()
    x = tokens(13, [(3, 4)])
    changed = x.clone()
    changed[0, 2] = 9  # change b: positions 0 and 1 must not see it
    attn = lambda t: model.attn(model.embed(t) + model.pos_embed)
    before, after = attn(x), attn(changed)
    torch.testing.assert_close(before[:, :2], after[:, :2], rtol=0, atol=0)
    assert not torch.allclose(before[:, 2:], after[:, 2:])


def per_sample_grads_match_backward(model, inputs, targets):
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of_one(params, x, y):
        return F.cross_entropy(functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

    batched = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, inputs, targets)
    for k in range(len(targets)):
        model.zero_grad()
        F.cross_entropy(model(inputs[k : k + 1]), targets[k : k + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(batched[name][k], p.grad, rtol=1e-10, atol=1e-12)


def test_transformer_per_sample_gradients_via_vmap_equal_backward_loop():
    torch.manual_seed(0)
    model = ModAddTransformer(13, 16, 4, 32).double()
    x = tokens(13, [(1, 2), (12, 0), (5, 5), (7, 3)])
    per_sample_grads_match_backward(model, x, (x[:, 0] + x[:, 2]) % 13)


def test_resnet9_per_sample_gradients_via_vmap_equal_backward_loop():
    torch.manual_seed(0)
    model = ResNet9(1, 2, 4).double()
    per_sample_grads_match_backward(model, torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 1]))


def test_jacrev_of_functional_call_matches_autograd():
    torch.manual_seed(0)
    model = ModAddTransformer(7, 8, 2, 16).double()
    params = {name: p.detach() for name, p in model.named_parameters()}
    x = tokens(7, [(3, 1)])
    jac = jacrev(lambda prm: functional_call(model, prm, (x,)))(params)["unembed.weight"]
    out = model(x)
    row = torch.autograd.grad(out[0, 4], model.unembed.weight)[0]
    torch.testing.assert_close(jac[0, 4], row)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 8, 8), (2, 1, 4, 4)])
def test_resnet9_outputs_log_probabilities_for_small_and_large_inputs(shape):
    torch.manual_seed(0)
    model = ResNet9(shape[1], 2, 4).double()
    out = model(torch.randn(shape, dtype=torch.float64))
    assert out.shape == (2, 2)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, dtype=torch.float64))


def test_resnet9_rejects_too_small_images():
    with pytest.raises(ValueError, match="H, W >= 4"):
        ResNet9(1, 2, 4)(torch.randn(1, 1, 2, 2))
