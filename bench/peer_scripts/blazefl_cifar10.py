"""BlazeFL (PyPI ``blazefl`` 2.x, Python >= 3.12) on fedrac's ``+experiment=pfl_cifar10`` workload.

Run by ``bench/peers.py`` with BlazeFL's own interpreter (see docs/performance.md for its
venv). Same data file, CNN and initial weights as pfl_cifar10.py. BlazeFL's own API:
``FedAvgBaseServerHandler`` (samples ``cohort`` of the users without replacement, averages
the clients' flattened parameter vectors weighted by data size) and its sequential,
single-process ``FedAvgBaseClientTrainer`` (one model and one SGD optimizer reused for
every client, a ``DataLoader`` per client); central evaluation at round 0, every
``--eval-every`` rounds and after the last.

Prints ``[round 0/N]`` when set-up is done and ``[round i/N]`` after each round (flushed);
writes ``--summary`` (JSON: the final central evaluation).
"""

import json
from enum import StrEnum

import torch
from blazefl.contrib import (
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgPartitionType,
)
from blazefl.reproducibility import seed_everything
from torch.utils.data import DataLoader, TensorDataset
from workload import CNN, arguments

args = arguments()


class ModelName(StrEnum):
    CNN = "cnn"


blob = torch.load(args.data)
SHAPE, CLASSES, INIT = blob["test_x"].shape[1:], int(blob["num_classes"]), blob["state"]


class Selector:
    """BlazeFL's ModelSelector: fedrac's CNN with fedrac's initial weights."""

    def select_model(self, model_name):
        net = CNN(*SHAPE, CLASSES)
        net.load_state_dict(INIT)
        return net


class Partitions:
    """BlazeFL's PartitionedDataset over the data file (one TensorDataset per client)."""

    def __init__(self, xs, ys, test_x, test_y):
        self.train = [TensorDataset(x, y) for x, y in zip(xs, ys, strict=True)]
        self.test = TensorDataset(test_x, test_y)

    def get_dataset(self, type_, cid):
        return self.train[cid] if type_ == FedAvgPartitionType.TRAIN else self.test

    def set_dataset(self, type_, cid, dataset):
        if type_ == FedAvgPartitionType.TRAIN:
            self.train[cid] = dataset
        else:
            self.test = dataset

    def get_dataloader(self, type_, cid, batch_size, generator):
        ds = self.get_dataset(type_, cid)
        return DataLoader(ds, batch_size=batch_size or len(ds),
                          shuffle=type_ == FedAvgPartitionType.TRAIN, generator=generator)


seed_everything(args.seed)
data = Partitions(blob["x"], blob["y"], blob["test_x"], blob["test_y"])
num_clients = len(blob["x"])
del blob
server = FedAvgBaseServerHandler(model_selector=Selector(), model_name=ModelName.CNN,
                                 dataset=data, global_round=args.rounds,
                                 num_clients=num_clients, sample_ratio=args.cohort / num_clients,
                                 device="cpu", batch_size=1024, seed=args.seed)
trainer = FedAvgBaseClientTrainer(model_selector=Selector(), model_name=ModelName.CNN,
                                  dataset=data, device="cpu", num_clients=num_clients,
                                  epochs=args.epochs, batch_size=args.batch, lr=args.lr,
                                  seed=args.seed)
ev = server.get_summary()
print(f"[round 0/{args.rounds}]", flush=True)
while not server.if_stop():
    cids = server.sample_clients()
    trainer.local_process(server.downlink_package(), cids)
    for pack in trainer.uplink_package():
        server.load(pack)
    r = server.round
    if r % args.eval_every == 0 or r == args.rounds:
        ev = server.get_summary()
    print(f"[round {r}/{args.rounds}]", flush=True)
if args.summary:
    with open(args.summary, "w") as f:
        json.dump({"eval_loss": ev["server_loss"], "eval_accuracy": ev["server_acc"]}, f)
