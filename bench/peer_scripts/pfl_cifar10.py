"""pfl-research (PyPI ``pfl`` 0.6) on fedrac's ``+experiment=pfl_cifar10`` workload.

Run by ``bench/peers.py`` (one process per run; not part of fedrac). The data file holds the
exact tensors fedrac trains on (per-user partitions, test split, fedrac's initial weights),
so both systems start from the same weights on the same data. pfl's own API throughout:
``FederatedDataset.from_slices`` with its random user sampler (with replacement),
``PyTorchModel`` with a new local SGD optimizer per user, ``FederatedAveraging`` (central
SGD with lr 1.0 on the averaged model difference = plain weighted averaging,
``WeightByDatapoints``), its ``SimulatedBackend`` in one process, and
``CentralEvaluationCallback`` every ``--eval-every`` iterations.

Prints ``[round 0/N]`` when set-up is done and ``[round i/N]`` after each central iteration
(flushed); writes ``--summary`` (JSON: the final central evaluation).
"""

import json
import time

import numpy as np
import torch
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.callback.central_evaluation import CentralEvaluationCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel
from torch import nn
from workload import CNN, arguments

args = arguments()
torch.manual_seed(args.seed)
np.random.seed(args.seed)


class PflCNN(CNN):
    """fedrac's CNN plus the loss and metrics pfl calls (as in pfl-research's
    benchmarks/model/pytorch)."""

    def loss(self, x, y, eval=False):  # noqa: A002 - pfl's signature
        self.eval() if eval else self.train()
        return nn.functional.cross_entropy(self(x), y.long())

    @torch.no_grad()
    def metrics(self, x, y, eval=True):  # noqa: A002
        self.eval() if eval else self.train()
        logits = self(x)
        n = len(x)
        loss = float(nn.functional.cross_entropy(logits, y.long(), reduction="sum"))
        return {"loss": Weighted(loss, n),
                "accuracy": Weighted(float((logits.argmax(-1) == y).sum()), n)}


blob = torch.load(args.data)
users = {i: [x, y] for i, (x, y) in enumerate(zip(blob["x"], blob["y"], strict=True))}
train_fd = FederatedDataset.from_slices(users, get_user_sampler("random", list(users)))
central = Dataset(raw_data=[blob["test_x"], blob["test_y"]])
c, h, w = blob["test_x"].shape[1:]
net = PflCNN(c, h, w, int(blob["num_classes"]))
net.load_state_dict(blob["state"])
del blob
model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                     central_optimizer=torch.optim.SGD(net.parameters(), 1.0))
backend = SimulatedBackend(training_data=train_fd, val_data=None,
                           postprocessors=[WeightByDatapoints()])
algorithm_params = NNAlgorithmParams(central_num_iterations=args.rounds,
                                     evaluation_frequency=args.eval_every,
                                     train_cohort_size=args.cohort, val_cohort_size=0)
train_params = NNTrainHyperParams(local_learning_rate=args.lr, local_num_epochs=args.epochs,
                                  local_batch_size=args.batch)
eval_params = NNEvalHyperParams(local_batch_size=1024)


class RoundLines(TrainingProcessCallback):
    """The ``[round i/N]`` lines the benchmark timestamps."""

    def on_train_begin(self, *, model):
        print(f"[round 0/{args.rounds}]", flush=True)
        return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        print(f"[round {central_iteration + 1}/{args.rounds}] {time.time():.3f}", flush=True)
        return False, Metrics()


# central evaluation first, the round line last: a round's time includes its evaluation
callbacks = [CentralEvaluationCallback(central, model_eval_params=eval_params,
                                       frequency=args.eval_every), RoundLines()]
model = FederatedAveraging().run(algorithm_params=algorithm_params, backend=backend,
                                 model=model, model_train_params=train_params,
                                 model_eval_params=eval_params, callbacks=callbacks)
final = model.evaluate(central, eval_params=eval_params).to_simple_dict(to_lowercase=True)
if args.summary:
    with open(args.summary, "w") as f:
        json.dump({"eval_loss": final.get("loss"), "eval_accuracy": final.get("accuracy")}, f)
