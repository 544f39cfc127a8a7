import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap

import explaind as ex
from explaind.components import group_tensors
from explaind.models import (
    CNN_COMPONENTS,
    TRANSFORMER_COMPONENTS,
    ModAddTransformer,
    ResNet9,
)


def group_parameters(model: torch.nn.Module, components: dict[str, list[str]]) -> dict[str, list[str]]:
    """The model's parameter names per component, as explain(components=...) groups them."""
    return group_tensors([name for name, _ in model.named_parameters()], components)


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
    with pytest.raises(ex.InputError, match="'unembed.weight' is in no component"):
        group_parameters(ModAddTransformer(11, 16, 4, 32), {"rest": ["embed", "pos_embed", "attn", "mlp"]})


def test_group_parameters_refuses_a_component_that_matches_nothing():
    """A typo'd prefix left an empty component in the grouping (it was returned as [])."""
    groups = {**CNN_COMPONENTS, "conv5": ["conv5."]}
    with pytest.raises(ex.InputError, match=r"\{'conv5': \['conv5.'\]\}.*match no parameter tensor"):
        group_parameters(ResNet9(1, 2, 4), groups)


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


def causal_transformer_by_hand(model: ModAddTransformer, x: torch.Tensor) -> torch.Tensor:
    """The textbook causal one-layer Transformer, every position and head computed by loops,
    read at the last position: what the model's last-position shortcut must equal."""
    attn, rows = model.attn, []
    for tokens_ in x:
        h = model.embed.weight[tokens_] + model.pos_embed  # [4, d]
        out = h.clone()
        for i in range(4):
            for head in range(attn.W_Q.shape[0]):
                q = h[i] @ attn.W_Q[head]
                scores = torch.stack([q @ (h[j] @ attn.W_K[head]) for j in range(i + 1)]) / q.numel() ** 0.5
                mixed = sum(w * (h[j] @ attn.W_V[head]) for j, w in enumerate(scores.softmax(0)))
                out[i] = out[i] + mixed @ attn.W_O[head]
        out = out + model.mlp.fc_out(torch.relu(model.mlp.fc_in(out)))
        rows.append(F.log_softmax(model.unembed(out[-1]), dim=-1))
    return torch.stack(rows)


def test_transformer_equals_a_causal_transformer_computed_by_hand():
    torch.manual_seed(0)
    model = ModAddTransformer(13, 16, 4, 32).double()
    x = tokens(13, [(3, 4), (12, 0), (7, 7)])
    with torch.no_grad():
        torch.testing.assert_close(model(x), causal_transformer_by_hand(model, x), rtol=0, atol=1e-12)


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


@pytest.mark.parametrize("d_model, n_heads, d_mlp", [(0, 4, 32), (16, 0, 32), (-8, 2, 32), (16, -1, 32), (16, 4, 0)])
def test_transformer_refuses_sizes_below_one(d_model, n_heads, d_mlp):
    with pytest.raises(ValueError) as refused:
        ModAddTransformer(13, d_model, n_heads, d_mlp)
    assert str(refused.value) == (f"need d_model, n_heads and d_mlp >= 1, got d_model={d_model}, "
                                  f"n_heads={n_heads}, d_mlp={d_mlp}")


@pytest.mark.parametrize("bad", [15, 40, -1])
def test_transformer_refuses_tokens_outside_its_vocabulary(bad):
    """p = 13: residues 0 … 12, '+' 13, '=' 14; eagerly and under vmap (as explain calls it)."""
    model = ModAddTransformer(13, 16, 4, 32)
    x = torch.tensor([[1, 13, 2, 14], [3, 13, bad, 14]])
    message = "tokens must lie in 0 … 14 (residues 0 … 12, '+' = 13, '=' = 14); some lie outside: " \
              "build inputs for this model's p=13"
    with pytest.raises(ValueError) as eager:
        model(x)
    with pytest.raises(ValueError) as mapped:
        vmap(lambda row: model(row.unsqueeze(0)))(x)
    assert str(eager.value) == str(mapped.value) == message
    assert model(x[:1]).shape == (1, 15)  # the in-vocabulary row alone is fine


def resnet9_by_hand(model: ResNet9, images: torch.Tensor) -> torch.Tensor:
    """The layers of the class docstring written out, each 3x3 or 5x5 convolution by F.conv2d
    with its stride and padding, ReLU after each, the pools as maxima over reshaped windows and
    the logits scaled by 1/8: what the model's forward must equal."""

    def conv(layer, x, stride=1, padding=1):
        return torch.relu(F.conv2d(x, layer.conv.weight, layer.conv.bias, stride=stride, padding=padding))

    def residual(block, x):
        return x + conv(block.conv_b, conv(block.conv_a, x))

    x = residual(model.res1, conv(model.conv2, conv(model.conv1, images), stride=2, padding=2))
    x = conv(model.conv3, x)
    b, c, h, w = x.shape
    x = x[..., : h // 2 * 2, : w // 2 * 2].reshape(b, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))  # 2x2 max-pool
    x = conv(model.conv4, residual(model.res2, x)).flatten(2).max(dim=2).values  # global max-pool
    logits = x @ model.linear.weight.T / 8
    return logits - logits.logsumexp(dim=-1, keepdim=True)


@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (2, 1, 12, 10)])
def test_resnet9_equals_its_layers_computed_by_hand(shape):
    """16x16 leaves a 4x4 map for the global max-pool; 12x10 a 3x2 one after pooling 6x5 (the
    odd column dropped). The residual adds, both pools, the ReLUs and the scale each change it."""
    torch.manual_seed(0)
    model = ResNet9(shape[1], 3, 4).double()
    images = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), resnet9_by_hand(model, images), rtol=0, atol=1e-12)
