"""A node's error reply carries its exception type and an error id, not its paths or columns."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from flwr.app import ArrayRecord

from clients import handlers
from clients.client_app import make_client_app
from fedrac.adapters.sketch import SketchMismatchError
from fedrac.data import DataConfigError
from strategies.fedavg import FedAvgFPFT
from tests.helpers import run_strategy, settings_with

SECRET = "data-path='/srv/site0/patients.csv' has no column 'diagnosis' (columns: age, income)"


def _server_reasons(caplog, error: Exception, verbose: bool, monkeypatch) -> tuple[str, str]:
    def failing(cfg, msg, context):
        raise error

    monkeypatch.setattr(handlers, "handle_train", failing)
    app = make_client_app(settings_with(verbose_node_errors=verbose))
    with caplog.at_level(logging.INFO):
        run_strategy(FedAvgFPFT(run_seed=0),
                     ArrayRecord({"w": torch.zeros(2)}), 1, 2, app)
    server = "\n".join(r.getMessage() for r in caplog.records if r.name == "flwr"
                       and "failed:" in r.getMessage())
    node = "\n".join(r.getMessage() for r in caplog.records if r.name == "fedrac.node")
    return server, node


def test_the_server_sees_the_type_and_an_error_id_the_node_logs_the_rest(caplog, monkeypatch):
    server, node = _server_reasons(caplog, DataConfigError(SECRET), False, monkeypatch)
    assert server.count("failed:") == 2
    assert "DataConfigError on the node (error id" in server
    for secret in ("/srv/site0", "patients.csv", "diagnosis", "income"):
        assert secret not in server, secret
    ids = re.findall(r"error id ([0-9a-f]{8})", server)
    assert len(set(ids)) == 2
    for error_id in ids:  # the node's own log has the full text under the same id
        assert f"node error {error_id}: DataConfigError: {SECRET}" in node


def test_verbose_node_errors_sends_the_full_text(caplog, monkeypatch):
    server, _ = _server_reasons(caplog, DataConfigError(SECRET), True, monkeypatch)
    assert SECRET in server


def test_fedrac_s_own_public_errors_pass_unchanged(caplog, monkeypatch):
    text = "round 1: regenerated sketch fingerprint ab differs from the server's cd"
    server, _ = _server_reasons(caplog, SketchMismatchError(text), False, monkeypatch)
    assert text in server


@pytest.mark.parametrize("verbose", [False, True])
def test_the_deployment_client_app_reports_the_same_way(verbose, monkeypatch):
    from flwr.app import Context, RecordDict

    from clients.node_errors import NodeError
    from fedrac import flower_apps

    def failing(cfg, msg, context):
        raise DataConfigError(SECRET)

    monkeypatch.setattr(handlers, "handle_train", failing)
    monkeypatch.setattr(flower_apps, "deployment_config",
                        lambda run_config: {"verbose_node_errors": verbose})
    overrides = "num_rounds=2 verbose_node_errors=true" if verbose else "num_rounds=2"
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                  run_config={"overrides": overrides})
    with pytest.raises(NodeError) as err:
        flower_apps._client_train(None, ctx)  # the handler fails before reading the message
    assert (SECRET in str(err.value)) == verbose
    assert err.value.__cause__ is None and err.value.__suppress_context__
