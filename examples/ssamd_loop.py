"""SSAM-D: a random mask that drops and regrows entries every update_freq epochs (instance-style base optimizer)."""

import torch
import torch.nn.functional as F
from _digits import digits

from ssam import SSAMD

model, train_set, loader = digits()
epochs = 3

# [readme]
base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
drop_grow = dict(drop_rate=0.5, drop_strategy="gradient", growth_strategy="random", update_freq=1, T_end=epochs)
opt = SSAMD(model.parameters(), base, rho=0.1, sparsity=0.5, **drop_grow)
for epoch in range(epochs):
    for i, (x, y) in enumerate(loader):
        F.cross_entropy(model(x), y).backward()
        if i == 0 and opt.should_update(epoch):
            opt.update_mask(epoch)  # drop/grow from the gradient now in .grad
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
# [/readme]

print(f"mask density {opt.mask_density():.3f}")
