"""The training loop for big models: autocast precision, gradient accumulation, bad input."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from clients.handlers import settings_from
from fedrac.settings.config import ConfigError
from fedrac.settings.typed import settings_of
from fedrac.training.local import TrainSettings, train_locally
from strategies.base import client_config_record
from tests.helpers import run_config

CPU = torch.device("cpu")


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


def test_grad_accumulation_equals_one_step_of_the_effective_batch():
    """k micro-batches of b, one SGD step each k: the same weights as steps on batches of k*b
    (the loss of each micro-batch weighted by its share of the step's examples)."""
    x, y = _data(60)  # 60 = 2 steps of 24 and a last one of 12: uneven micro-batches too
    for k, b, steps in ((3, 8, None), (4, 5, 2), (2, 7, None)):
        accum, plain = _model(), _model()
        common = {"optimizer": "sgd", "lr": 0.3, "local_steps": steps, "max_grad_norm": 0.5}
        ra = train_locally(accum, x, y, TrainSettings(batch_size=b, grad_accum_steps=k,
                                                      **common), 7, CPU)
        rp = train_locally(plain, x, y, TrainSettings(batch_size=k * b, **common), 7, CPU)
        assert ra.steps == rp.steps and ra.num_examples == rp.num_examples
        assert steps is None or ra.steps == steps  # local_steps counts optimizer steps
        assert ra.loss == pytest.approx(rp.loss, rel=1e-5)
        for pa, pp in zip(accum.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(pa, pp, rtol=1e-5, atol=1e-6)
        assert not torch.equal(accum[0].weight, _model()[0].weight)  # it did train


def test_grad_accumulation_is_not_k_plain_steps():
    """Mutant guard: accumulating must differ from k separate steps of batch b."""
    x, y = _data(48)
    accum, plain = _model(), _model()
    train_locally(accum, x, y, TrainSettings(optimizer="sgd", lr=0.3, batch_size=8,
                                             grad_accum_steps=3), 7, CPU)
    train_locally(plain, x, y, TrainSettings(optimizer="sgd", lr=0.3, batch_size=8), 7, CPU)
    assert not torch.allclose(accum[0].weight, plain[0].weight, atol=1e-4)


def test_bf16_autocast_on_cpu_trains_and_the_loss_falls():
    x, y = _data(128)
    model = _model()
    settings = TrainSettings(lr=0.05, batch_size=16, local_epochs=1, precision="bf16")
    first = train_locally(model, x, y, settings, 0, CPU)
    for r in range(1, 6):
        last = train_locally(model, x, y, settings, r, CPU)
    assert last.loss < 0.8 * first.loss
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    seen = []
    hook = model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    train_locally(model, x, y, TrainSettings(local_steps=1, precision="bf16"), 0, CPU)
    hook.remove()
    assert seen == [torch.bfloat16]  # the matmul ran under bf16 autocast


def test_precision_and_accumulation_travel_to_clients(tmp_path):
    cfg = run_config(tmp_path, "client.precision=bf16", "client.grad_accum_steps=4")
    record = client_config_record(settings_of(cfg).client)
    assert record["precision"] == "bf16" and record["grad-accum-steps"] == 4
    settings = settings_from(record)
    assert settings.precision == "bf16" and settings.grad_accum_steps == 4
    default = client_config_record(settings_of(run_config(tmp_path)).client)
    assert "precision" not in default and "grad-accum-steps" not in default


@pytest.mark.parametrize(("override", "message"), [
    ("client.precision=fp16", "client.precision=fp16 is not allowed on device cpu; allowed: "
                              "fp32, bf16"),
    ("client.precision=fp8", "client.precision='fp8' is not allowed; allowed: fp32, bf16, fp16"),
    ("client.grad_accum_steps=0", "client.grad_accum_steps=0 is not allowed; allowed: an "
                                  "integer >= 1"),
])
def test_bad_precision_and_accumulation_stop_the_cli_with_exit_2(
        tmp_path, override, message, monkeypatch, capsys):
    """One line on stderr, exit 2, nothing written: before any work."""
    from fedrac import cli

    if "fp16" in override and torch.cuda.is_available():
        pytest.skip("fp16 is allowed where CUDA is")
    with pytest.raises(ConfigError) as err:
        run_config(tmp_path, override)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    out = tmp_path / "run"
    monkeypatch.setenv("FEDRAC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["fedrac", override, f"output_dir={out}",
                                      f"hydra.run.dir={tmp_path / 'hydra'}"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fedrac: error: {message}"), lines
    assert not out.exists()


def test_train_locally_refuses_fp16_on_cpu():
    x, y = _data(8)
    with pytest.raises(ValueError, match="client.precision=fp16 is not allowed on device cpu"):
        train_locally(_model(), x, y, TrainSettings(precision="fp16"), 0, CPU)


def test_batched_clients_leave_precision_and_accumulation_to_the_sequential_loop(tmp_path):
    from clients.batched import run_reason

    assert run_reason(settings_of(run_config(tmp_path))) is None
    for override in ("client.precision=bf16", "client.grad_accum_steps=2"):
        reason = run_reason(settings_of(run_config(tmp_path, override)))
        assert reason == "client.precision / client.grad_accum_steps are not batched"


def test_causal_lm_accumulation_weighs_micro_batches_by_their_loss_tokens():
    """Token-mean loss: micro-batches with few loss tokens weigh less; 2 x 2 rows equal one
    step of 4 rows (a mean over examples would not)."""
    from fedrac.data.text import TokenData
    from fedrac.models.hf import build_hf_model
    from fedrac.tasks import get_task
    from tests import hf_models as H

    vocab = {"<s>": 0, "</s>": 1, **{f"t{i}": i + 2 for i in range(20)}}
    cfg = {"name": "hf", "config": H.model_config("llama", vocab), "task": "causal_lm",
           "trainable_modules": "auto"}
    g = torch.Generator().manual_seed(0)
    lengths, answers = [12, 3, 9, 4, 11, 5, 7, 10], [10, 1, 2, 3, 9, 1, 6, 2]
    ids = [torch.randint(2, 22, (n,), generator=g) for n in lengths]
    mask = [torch.cat([torch.zeros(n - k, dtype=torch.long), torch.ones(k, dtype=torch.long)])
            for n, k in zip(lengths, answers, strict=True)]
    data = TokenData(input_ids=ids, labels=None, pad_id=0, loss_mask=mask)
    task = get_task("causal_lm")
    models = []
    for batch, k in ((2, 2), (4, 1)):
        model = build_hf_model(cfg, 0)
        train_locally(model, data, None, TrainSettings(optimizer="sgd", lr=1.0, local_steps=1,
                                                       batch_size=batch, grad_accum_steps=k),
                      3, CPU, task)
        models.append(model)
    start = build_hf_model(cfg, 0)
    for (name, pa), pb in zip(models[0].named_parameters(), models[1].parameters(),
                              strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, p0) for p, p0 in zip(models[0].parameters(),
                                                        start.parameters(), strict=True))


def test_fp16_grad_scaler_path_trains_and_unscales_before_clipping(monkeypatch):
    """The fp16 path (autocast, GradScaler: scale, unscale before clipping, step, update),
    run on CPU with the device check lifted (fp16 is CUDA's: no GPU here)."""
    import fedrac.training.local as lt

    monkeypatch.setattr(lt, "check_precision", lambda *a: None)
    steps = []
    real = torch.amp.GradScaler.unscale_
    monkeypatch.setattr(torch.amp.GradScaler, "unscale_",
                        lambda self, opt: (steps.append(self.get_scale()), real(self, opt)))
    x, y = _data(128)
    model = _model()
    common = {"optimizer": "sgd", "lr": 0.3, "batch_size": 16, "max_grad_norm": 0.5,
              "grad_accum_steps": 2}  # SGD: a step on still-scaled (clipped) gradients is ~0
    first = train_locally(model, x, y, TrainSettings(precision="fp16", **common), 0, CPU)
    for r in range(1, 6):
        last = train_locally(model, x, y, TrainSettings(precision="fp16", **common), r, CPU)
    assert steps and all(s > 1 for s in steps)  # the loss was scaled, then unscaled
    assert last.loss < 0.8 * first.loss
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
