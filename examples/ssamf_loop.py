"""SSAM-F: perturb only the entries with the largest empirical Fisher, refreshed every update_freq epochs."""

import torch
import torch.nn.functional as F
from _digits import digits

from ssam import SSAMF

model, train_set, loader = digits()
epochs = 3

# [readme]
sgd = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
opt = SSAMF(model.named_parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, num_samples=16, update_freq=1, **sgd)
for epoch in range(epochs):
    if opt.should_update(epoch):
        opt.update_mask(model, train_set)  # empirical Fisher of 16 random training examples
    for x, y in loader:

        def closure():  # forward + backward, returns the loss
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        closure()  # gradient at w
        loss = opt.step(closure)  # perturb, closure at w + e, restore, SGD step
        opt.zero_grad()
# [/readme]

print(f"mask density {opt.mask_density():.3f}, final batch loss {loss.item():.3f}")
